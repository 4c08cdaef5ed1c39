// Live loss chart for the Cinetune LoRA trainer nodes.
//
// The trainer sends one websocket event per optimizer step:
//   "cinetune.train.progress" {node, prompt_id, run, step, max_steps, loss, loss_ema, lr, steps_per_s, eta_s, epoch,
//                              loss_terms, grad_norm?, validation_loss?, checkpoint?}
// loss_terms names the parts of the loss (LTX-2: {video, audio}; empty for a one-part loss); validation_loss is the
// held-out loss when it was measured at that step (else null or absent); checkpoint is the path of a checkpoint
// written at that step (else null or absent). Status events:
//   "cinetune.train.status"   {node, prompt_id, run, status, step?, message}
// with status started | checkpoint (message: path) | validation (message: clip path) | interrupted (a message that
// is a .safetensors path is shown as the partial LoRA installed on Cancel) | finished (message: the LoRA's path).
// `node` is the trainer's unique id (a string). Each trainer node gets a DOM widget: a toolbar (legend, "log y" and
// "full run" toggles), a <canvas> chart and a readout whose lines wrap; the widget grows and shrinks with the node.
// It shows only the events whose `node` equals String(node.id); nodes inside subgraphs (composite ids "outer:inner")
// are not matched.
//
// Chart: raw loss as points, the smoothed loss (EMA) as a line, loss parts and the validation loss as lines,
// checkpoints as dashed vertical markers and validation clips as dotted ones. Axes are titled (step, loss) and tick at
// round numbers (chart_scale.js). The x axis follows the run (0 … last step) or, with "full run", spans max_steps.
// The toggles are stored in the node's properties, so they are saved with the workflow but never queued.
//
// For tests, the chart canvas carries data-cinetune-chart="loss", data-node-id, data-points (stored points plus a
// partly filled bucket), data-last-step, data-run, data-status, data-terms (loss parts drawn, comma separated),
// data-axis-titles ("step,loss"), data-x-ticks / data-y-ticks (tick values, comma separated), data-x-range
// ("min,max"), data-log-y ("on", "off" or "unavailable"), data-full-run, data-checkpoints and data-validations
// (markers drawn), refreshed on every redraw. The readout is .cinetune-loss-readout, one .cinetune-loss-line per
// line; the LoRA's path, once known, is the last line (.cinetune-loss-lora). The legend is .cinetune-loss-legend with
// one [data-series] item per series.
// The only global is window.cinetune.lossChart ({liveCount(), maxPoints}).

import { formatTick, linearScale, logScale } from "./chart_scale.js";
import { LossSeries, finite, formatDuration, formatNumber, lossTerms, robustMax } from "./loss_series.js";

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const NODE_CLASSES = new Set(["CinetuneK5TrainLoRA", "CinetuneLTX2TrainLoRA"]);
const WIDGET_NAME = "loss_chart";
const WIDGET_TYPE = "cinetune_loss_chart";
const PROGRESS_EVENT = "cinetune.train.progress";
const STATUS_EVENT = "cinetune.train.status";
const MAX_POINTS = 5000;
const MIN_HEIGHT = 240;
const MIN_WIDTH = 420;
const PROPERTY_LOG_Y = "cinetune_chart_log_y";
const PROPERTY_FULL_RUN = "cinetune_chart_full_run";
const LORA_FILE = /\.safetensors\s*$/i;

const COLORS = {
    background: "#14171c",
    grid: "rgba(255, 255, 255, 0.09)",
    axis: "rgba(255, 255, 255, 0.28)",
    axisText: "#9aa3ad",
    raw: "rgba(102, 178, 255, 0.55)",
    smoothed: "#ffb347",
    validation: "#f778ba",
    checkpoint: "rgba(140, 220, 140, 0.75)",
    empty: "#6b737c",
};
// Loss parts by name; other names take the spare colours in order.
const TERM_COLORS = { video: "#7ee787", audio: "#d2a8ff" };
const SPARE_TERM_COLORS = ["#ff7b72", "#79c0ff", "#e3b341"];
const FONT = "10px sans-serif";
const TITLE_FONT = "11px sans-serif";

const liveCharts = new Set();

function termColor(name, index) {
    return TERM_COLORS[name] ?? SPARE_TERM_COLORS[index % SPARE_TERM_COLORS.length];
}

function styled(tag, className, style) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    Object.assign(element.style, style);
    return element;
}

class LossChart {
    constructor(node) {
        this.node = node;
        this.series = new LossSeries(MAX_POINTS);
        this.run = null;
        this.promptId = null;
        this.latest = null; // the last progress event
        this.status = null; // the last status event
        this.checkpoints = []; // [{step, path}]
        this.validations = []; // [{step, loss (or NaN), path}] held-out losses and validation clips, by step
        this.lora = null; // {path, partial}: where the LoRA went
        this.frame = 0;
        this.disposed = false;
        this.buildDom();

        this.onProgress = (event) => this.handleProgress(event.detail);
        this.onStatus = (event) => this.handleStatus(event.detail);
        api.addEventListener(PROGRESS_EVENT, this.onProgress);
        api.addEventListener(STATUS_EVENT, this.onStatus);

        this.resizeObserver = typeof ResizeObserver === "function" ? new ResizeObserver(() => this.schedule()) : null;
        this.resizeObserver?.observe(this.canvas);
        liveCharts.add(this);
        this.schedule();
    }

    buildDom() {
        this.element = styled("div", "cinetune-loss-chart", {
            display: "flex", flexDirection: "column", gap: "3px", width: "100%", height: "100%",
            boxSizing: "border-box", pointerEvents: "none", // drags and wheel zoom go to the graph canvas
        });
        const toolbar = styled("div", "cinetune-loss-toolbar", {
            display: "flex", flexWrap: "wrap", alignItems: "center", gap: "4px 10px", flex: "0 0 auto",
            font: "11px sans-serif", color: "var(--input-text, #ddd)",
        });
        this.legend = styled("div", "cinetune-loss-legend", {
            display: "flex", flexWrap: "wrap", gap: "2px 10px", flex: "1 1 auto", minWidth: "0",
        });
        const toggles = styled("div", "cinetune-loss-toggles", { display: "flex", gap: "4px", marginLeft: "auto" });
        this.logToggle = this.toggle("log y", PROPERTY_LOG_Y, "Logarithmic loss axis");
        this.fullToggle = this.toggle("full run", PROPERTY_FULL_RUN, "Show the whole run (0 … max steps) on the x axis");
        toggles.append(this.logToggle, this.fullToggle);
        toolbar.append(this.legend, toggles);
        this.canvas = styled("canvas", "", {
            flex: "1 1 auto", minHeight: "60px", width: "100%", borderRadius: "4px", background: COLORS.background,
        });
        this.canvas.dataset.cinetuneChart = "loss";
        this.readout = styled("div", "cinetune-loss-readout", {
            flex: "0 0 auto", font: "11px monospace", color: "var(--input-text, #ddd)", lineHeight: "15px",
            whiteSpace: "normal", overflowWrap: "anywhere", pointerEvents: "auto", userSelect: "text",
        });
        this.element.append(toolbar, this.canvas, this.readout);
    }

    toggle(label, property, title) {
        const button = styled("button", "cinetune-loss-toggle", {
            pointerEvents: "auto", font: "10px sans-serif", padding: "1px 6px", borderRadius: "3px", cursor: "pointer",
            border: "1px solid var(--border-color, #555)", background: "transparent", color: "var(--input-text, #ddd)",
        });
        button.type = "button";
        button.textContent = label;
        button.title = title;
        button.dataset.property = property;
        // The graph canvas would start a drag or select the node on these events.
        for (const name of ["pointerdown", "mousedown", "wheel"]) button.addEventListener(name, (e) => e.stopPropagation());
        button.addEventListener("click", (event) => {
            event.stopPropagation();
            this.node.properties = this.node.properties ?? {};
            this.node.properties[property] = !this.option(property);
            this.schedule();
        });
        return button;
    }

    option(property) {
        return Boolean(this.node.properties?.[property]);
    }

    matches(data) {
        if (this.disposed || !data) return false;
        // Only nodes of the root graph: ids inside a subgraph are local and could equal a root node's id.
        // A node not (yet) in a graph ignores events.
        const graph = this.node.graph;
        if (graph == null || (graph.rootGraph && graph.rootGraph !== graph)) return false;
        return String(this.node.id) === String(data.node);
    }

    isNewRun(data) {
        return (data.run ?? null) !== this.run || (data.prompt_id ?? null) !== this.promptId;
    }

    reset(run, promptId) {
        this.series.clear();
        this.checkpoints = [];
        this.validations = [];
        this.lora = null;
        this.latest = null;
        this.status = null;
        this.run = run ?? null;
        this.promptId = promptId ?? null;
    }

    /** Forget markers at or after `step` (a run resumed from an earlier checkpoint re-sends those steps). */
    truncateMarkers(step) {
        this.checkpoints = this.checkpoints.filter((c) => c.step < step);
        this.validations = this.validations.filter((v) => v.step < step);
    }

    addCheckpoint(step, path) {
        if (!finite(step)) return;
        const known = this.checkpoints.find((c) => c.step === step);
        if (known) known.path = path ?? known.path;
        else this.checkpoints.push({ step, path: path ?? null });
    }

    addValidation(step, loss, path) {
        if (!finite(step)) return;
        let entry = this.validations.find((v) => v.step === step);
        if (!entry) {
            entry = { step, loss: NaN, path: null };
            this.validations.push(entry);
            this.validations.sort((a, b) => a.step - b.step);
        }
        if (finite(loss)) entry.loss = loss;
        if (path) entry.path = path;
    }

    handleProgress(data) {
        if (!this.matches(data) || !finite(data.step)) return;
        if (this.isNewRun(data)) this.reset(data.run, data.prompt_id);
        if (this.series.lastStep !== null && data.step <= this.series.lastStep) this.truncateMarkers(data.step);
        if (finite(data.loss)) {
            this.series.add(data.step, data.loss, finite(data.loss_ema) ? data.loss_ema : data.loss, lossTerms(data));
        }
        if (finite(data.validation_loss)) this.addValidation(data.step, data.validation_loss, null);
        if (typeof data.checkpoint === "string" && data.checkpoint) this.addCheckpoint(data.step, data.checkpoint);
        this.latest = data;
        this.schedule();
    }

    handleStatus(data) {
        if (!this.matches(data)) return;
        if (data.status === "started" || this.isNewRun(data)) this.reset(data.run, data.prompt_id);
        const step = finite(data.step) ? data.step : this.latest?.step;
        if (data.status === "checkpoint") this.addCheckpoint(step, data.message || null);
        if (data.status === "validation") this.addValidation(step, NaN, data.message || null);
        if (data.status === "finished" && data.message) this.lora = { path: data.message, partial: false };
        if (data.status === "interrupted" && LORA_FILE.test(data.message ?? "")) {
            this.lora = { path: data.message.trim(), partial: true }; // the partial LoRA installed on Cancel
        }
        this.status = data;
        this.schedule();
    }

    schedule() {
        if (this.disposed || this.frame) return;
        this.frame = requestAnimationFrame(() => {
            this.frame = 0;
            this.draw();
        });
    }

    readoutLines() {
        const d = this.latest;
        const lines = [];
        if (!d) {
            lines.push(this.status ? `${this.status.status}: ${this.status.message ?? ""}` : "waiting for training");
        } else {
            const parts = Object.entries(lossTerms(d)).map(([name, value]) => ` · ${name} ${formatNumber(value)}`);
            lines.push(`step ${d.step}/${d.max_steps ?? "?"} · loss ${formatNumber(d.loss)} · smoothed `
                + `${formatNumber(d.loss_ema)}${parts.join("")}`);
            const lr = finite(d.lr) ? d.lr.toExponential(2) : "–";
            const speed = finite(d.steps_per_s) ? d.steps_per_s.toFixed(2) : "–";
            const grad = finite(d.grad_norm) ? ` · grad norm ${formatNumber(d.grad_norm, 3)}` : "";
            const epoch = finite(d.epoch) ? ` · epoch ${d.epoch}` : "";
            lines.push(`lr ${lr}${grad} · ${speed} it/s · ETA ${formatDuration(d.eta_s)}${epoch}`);
        }
        const measured = this.validations.filter((v) => finite(v.loss));
        if (measured.length) {
            const last = measured[measured.length - 1];
            lines.push(`validation loss ${formatNumber(last.loss)} at step ${last.step}`);
        }
        const clip = [...this.validations].reverse().find((v) => v.path);
        if (clip) lines.push(`validation clip (step ${clip.step}): ${clip.path}`);
        const checkpoint = this.checkpoints[this.checkpoints.length - 1];
        if (checkpoint) lines.push(`checkpoint at step ${checkpoint.step}${checkpoint.path ? `: ${checkpoint.path}` : ""}`);
        const status = this.status?.status;
        if (d && status === "finished") lines.push("finished");
        if (d && status === "interrupted" && !this.lora) lines.push(`interrupted: ${this.status.message ?? ""}`);
        return lines;
    }

    renderReadout() {
        const lines = this.readoutLines();
        const lora = this.lora ? `${this.lora.partial ? "interrupted · partial LoRA" : "LoRA"}: ${this.lora.path}` : null;
        const key = JSON.stringify([lines, lora]);
        if (this.readoutKey === key) return;
        this.readoutKey = key;
        const children = lines.map((text) => {
            const line = styled("div", "cinetune-loss-line", {});
            line.textContent = text;
            return line;
        });
        if (lora) {
            const line = styled("div", "cinetune-loss-line cinetune-loss-lora", { color: "#7ee787" });
            line.textContent = lora;
            line.title = this.lora.path;
            children.push(line);
        }
        this.readout.replaceChildren(...children);
    }

    renderLegend(termNames) {
        const items = [["raw", COLORS.raw, "dot"], ["smoothed", COLORS.smoothed, "line"],
            ["validation", COLORS.validation, "line"],
            ...termNames.map((name, index) => [name, termColor(name, index), "line"])];
        if (this.checkpoints.length) items.push(["checkpoint", COLORS.checkpoint, "marker"]);
        const key = JSON.stringify(items);
        if (this.legendKey !== key) {
            this.legendKey = key;
            this.legend.replaceChildren(...items.map(([label, color, kind]) => {
                const item = styled("span", "cinetune-loss-legend-item", {
                    display: "inline-flex", alignItems: "center", gap: "4px", whiteSpace: "nowrap",
                });
                item.dataset.series = label;
                const swatch = styled("span", "", kind === "dot"
                    ? { width: "6px", height: "6px", borderRadius: "3px", background: color }
                    : { width: "14px", height: "0", borderTop: `2px ${kind === "marker" ? "dashed" : "solid"} ${color}` });
                const text = styled("span", "", {});
                text.textContent = label;
                item.append(swatch, text);
                return item;
            }));
        }
        for (const [button, property] of [[this.logToggle, PROPERTY_LOG_Y], [this.fullToggle, PROPERTY_FULL_RUN]]) {
            const on = this.option(property);
            button.setAttribute("aria-pressed", String(on));
            button.style.background = on ? "var(--comfy-input-bg, #3a4250)" : "transparent";
            button.style.fontWeight = on ? "bold" : "normal";
        }
    }

    /** The y values the scale must cover: raw loss (robust upper end), smoothed, loss parts, validation. */
    yExtent(losses, emas, termNames) {
        let low = Infinity, high = -Infinity;
        const take = (v) => {
            if (finite(v)) {
                low = Math.min(low, v);
                high = Math.max(high, v);
            }
        };
        emas.forEach(take);
        for (const name of termNames) this.series.forEachTerm(name, (_step, value) => take(value));
        for (const v of this.validations) take(v.loss);
        for (const v of losses) low = Math.min(low, v);
        high = robustMax(losses, high);
        return [low, high];
    }

    draw() {
        if (this.disposed) return;
        const series = this.series;
        const ds = this.canvas.dataset;
        const logWanted = this.option(PROPERTY_LOG_Y), fullRun = this.option(PROPERTY_FULL_RUN);
        ds.nodeId = String(this.node.id);
        ds.points = String(series.length);
        ds.lastStep = series.lastStep === null ? "" : String(series.lastStep);
        ds.run = this.run ?? "";
        ds.status = this.status?.status ?? "";
        ds.terms = series.termNames.join(",");
        ds.fullRun = fullRun ? "on" : "off";
        this.renderReadout();
        this.renderLegend(series.termNames);

        const cssWidth = this.canvas.clientWidth, cssHeight = this.canvas.clientHeight;
        if (cssWidth < 2 || cssHeight < 2) return; // hidden (off screen, zoomed out, collapsed)
        const dpr = window.devicePixelRatio || 1;
        const width = Math.round(cssWidth * dpr), height = Math.round(cssHeight * dpr);
        if (this.canvas.width !== width || this.canvas.height !== height) {
            this.canvas.width = width;
            this.canvas.height = height;
        }
        const ctx = this.canvas.getContext("2d");
        ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
        ctx.fillStyle = COLORS.background;
        ctx.fillRect(0, 0, cssWidth, cssHeight);
        ctx.font = FONT;

        if (series.length === 0) {
            for (const key of ["axisTitles", "xTicks", "yTicks", "xRange", "logY", "checkpoints", "validations"]) {
                delete ds[key];
            }
            ctx.fillStyle = COLORS.empty;
            ctx.textAlign = "center";
            ctx.textBaseline = "middle";
            ctx.fillText("loss chart: waiting for training steps", cssWidth / 2, cssHeight / 2);
            return;
        }

        const steps = [], losses = [], emas = [];
        series.forEach((step, loss, ema) => {
            steps.push(step);
            losses.push(loss);
            emas.push(ema);
        });
        const termNames = series.termNames;
        const [low, high] = this.yExtent(losses, emas, termNames);
        const y = (logWanted && logScale(low, high)) || linearScale(low, high, Math.max(2, Math.floor(cssHeight / 40)));
        ds.logY = y.log ? "on" : logWanted ? "unavailable" : "off";

        const lastStep = steps[steps.length - 1];
        const maxSteps = finite(this.latest?.max_steps) ? this.latest.max_steps : 0;
        const firstStep = steps[0] <= 1 ? 0 : steps[0];
        const xTarget = Math.max(2, Math.floor(cssWidth / 90));
        let x = linearScale(firstStep, Math.max(lastStep, firstStep + 1), xTarget, true);
        if (fullRun && maxSteps > 0) {
            x = linearScale(Math.min(firstStep, 0), Math.max(maxSteps, lastStep), xTarget, true);
            x = { ...x, max: Math.max(maxSteps, lastStep), ticks: x.ticks.filter((t) => t <= Math.max(maxSteps, lastStep)) };
        }
        ds.xRange = `${x.min},${x.max}`;
        ds.xTicks = x.ticks.join(",");
        ds.yTicks = y.ticks.join(",");

        const left = 52, right = 10, top = 8, bottom = 32;
        const plotW = Math.max(1, cssWidth - left - right), plotH = Math.max(1, cssHeight - top - bottom);
        const px = (step) => left + ((step - x.min) / (x.max - x.min)) * plotW;
        const yFraction = y.log
            ? (v) => (Math.log10(v) - Math.log10(y.min)) / (Math.log10(y.max) - Math.log10(y.min))
            : (v) => (v - y.min) / (y.max - y.min);
        const py = (value) => top + (1 - Math.min(1, Math.max(0, yFraction(y.log ? Math.max(value, y.min) : value)))) * plotH;

        this.drawAxes(ctx, { x, y, px, py, left, top, plotW, plotH, cssHeight });
        ds.checkpoints = String(this.drawMarkers(ctx, this.checkpoints, COLORS.checkpoint, [4, 3], x, px, top, plotH));
        ds.validations = String(this.drawMarkers(ctx, this.validations, COLORS.validation, [1, 3], x, px, top, plotH));

        // Raw loss as points (a thin line joins them while they are sparse).
        ctx.fillStyle = COLORS.raw;
        ctx.strokeStyle = COLORS.raw;
        ctx.lineWidth = 1;
        const sparse = steps.length <= plotW / 3;
        if (sparse) this.polyline(ctx, steps.map((s, i) => [px(s), py(losses[i])]));
        const r = sparse ? 2 : 1.2;
        for (let i = 0; i < steps.length; i++) ctx.fillRect(px(steps[i]) - r, py(losses[i]) - r, 2 * r, 2 * r);

        ctx.lineWidth = 2;
        ctx.strokeStyle = COLORS.smoothed;
        this.polyline(ctx, steps.map((s, i) => [px(s), py(emas[i])]));

        ctx.lineWidth = 1.5;
        termNames.forEach((name, index) => {
            const points = [];
            series.forEachTerm(name, (step, value) => points.push([px(step), py(value)]));
            ctx.strokeStyle = termColor(name, index);
            this.polyline(ctx, points);
        });

        const measured = this.validations.filter((v) => finite(v.loss)).map((v) => [px(v.step), py(v.loss)]);
        ctx.strokeStyle = ctx.fillStyle = COLORS.validation;
        ctx.lineWidth = 1.5;
        this.polyline(ctx, measured);
        for (const [vx, vy] of measured) {
            ctx.beginPath();
            ctx.arc(vx, vy, 3, 0, 2 * Math.PI);
            ctx.fill();
        }
    }

    drawAxes(ctx, { x, y, px, py, left, top, plotW, plotH, cssHeight }) {
        ctx.lineWidth = 1;
        ctx.font = FONT;
        ctx.fillStyle = COLORS.axisText;
        ctx.textAlign = "right";
        ctx.textBaseline = "middle";
        for (const value of y.ticks) {
            const yy = Math.round(py(value)) + 0.5;
            ctx.strokeStyle = COLORS.grid;
            this.polyline(ctx, [[left, yy], [left + plotW, yy]]);
            ctx.fillText(formatTick(value), left - 4, yy);
        }
        ctx.textAlign = "center";
        ctx.textBaseline = "top";
        for (const value of x.ticks) {
            const xx = Math.round(px(value)) + 0.5;
            ctx.strokeStyle = COLORS.grid;
            this.polyline(ctx, [[xx, top], [xx, top + plotH]]);
            ctx.fillText(formatTick(value), xx, top + plotH + 3);
        }
        ctx.strokeStyle = COLORS.axis;
        this.polyline(ctx, [[left + 0.5, top], [left + 0.5, top + plotH + 0.5], [left + plotW, top + plotH + 0.5]]);

        ctx.font = TITLE_FONT;
        ctx.fillStyle = COLORS.axisText;
        ctx.textAlign = "center";
        ctx.textBaseline = "bottom";
        ctx.fillText("step", left + plotW / 2, cssHeight - 1);
        ctx.save();
        ctx.translate(11, top + plotH / 2);
        ctx.rotate(-Math.PI / 2);
        ctx.textBaseline = "middle";
        ctx.fillText(y.log ? "loss (log)" : "loss", 0, 0);
        ctx.restore();
        this.canvas.dataset.axisTitles = "step,loss";
    }

    /** Vertical markers at each entry's step inside the x range; returns how many were drawn. */
    drawMarkers(ctx, entries, color, dash, x, px, top, plotH) {
        let drawn = 0;
        ctx.strokeStyle = color;
        ctx.lineWidth = 1;
        ctx.setLineDash(dash);
        for (const { step } of entries) {
            if (!(step >= x.min && step <= x.max)) continue;
            const xx = Math.round(px(step)) + 0.5;
            this.polyline(ctx, [[xx, top], [xx, top + plotH]]);
            drawn += 1;
        }
        ctx.setLineDash([]);
        return drawn;
    }

    polyline(ctx, points) {
        if (points.length === 0) return;
        ctx.beginPath();
        points.forEach(([a, b], i) => (i === 0 ? ctx.moveTo(a, b) : ctx.lineTo(a, b)));
        ctx.stroke();
    }

    dispose() {
        if (this.disposed) return;
        this.disposed = true;
        api.removeEventListener(PROGRESS_EVENT, this.onProgress);
        api.removeEventListener(STATUS_EVENT, this.onStatus);
        if (this.frame) cancelAnimationFrame(this.frame);
        this.frame = 0;
        this.resizeObserver?.disconnect();
        liveCharts.delete(this);
    }
}

function attachChart(node) {
    if (node.widgets?.some((w) => w.name === WIDGET_NAME)) return;
    const chart = new LossChart(node);
    const widget = node.addDOMWidget(WIDGET_NAME, WIDGET_TYPE, chart.element, {
        serialize: false, // keeps the chart out of the API prompt
        hideOnZoom: true,
        getMinHeight: () => MIN_HEIGHT, // no maximum: the chart takes the node's free height when it is resized
        getValue: () => undefined,
        setValue: () => {},
    });
    widget.serialize = false; // keeps the chart out of widgets_values in saved workflows
    widget.serializeValue = () => undefined;
    node.cinetuneLossChart = chart;

    const onRemoved = node.onRemoved;
    node.onRemoved = function () {
        chart.dispose();
        if (widget.element?.isConnected) widget.element.remove();
        return onRemoved?.apply(this, arguments);
    };
    const onResize = node.onResize;
    node.onResize = function () {
        chart.schedule();
        return onResize?.apply(this, arguments);
    };

    const [width, height] = node.size;
    node.setSize([Math.max(width, MIN_WIDTH), Math.max(height, node.computeSize()[1])]);
}

function isTrainer(node) {
    return NODE_CLASSES.has(node?.comfyClass ?? node?.constructor?.comfyClass);
}

window.cinetune = window.cinetune || {};
window.cinetune.lossChart = Object.freeze({
    maxPoints: MAX_POINTS,
    liveCount: () => liveCharts.size,
});

app.registerExtension({
    name: "cinetune.lossChart",
    nodeCreated(node) {
        if (isTrainer(node)) attachChart(node);
    },
    loadedGraphNode(node) {
        node.cinetuneLossChart?.schedule(); // the node has its saved id and properties now
    },
});
