// Live loss chart for the Cinetune LoRA trainer node.
//
// The trainer sends one websocket event per optimizer step:
//   "cinetune.train.progress" {node, prompt_id, run, step, max_steps, loss, loss_ema, lr, steps_per_s, eta_s,
//                              loss_terms}
// where loss_terms names the parts of the loss (LTX-2: {video, audio}; empty for a one-part loss). Each part is drawn
// as its own thin line and shown in the readout.
// and status events:
//   "cinetune.train.status"   {node, prompt_id, run, status: started|checkpoint|finished|interrupted, step, message}
// `node` is the trainer's unique id (a string). Each trainer node on the canvas gets a DOM widget with a
// <canvas> chart and a one-line readout, and shows only the events whose `node` equals String(node.id).
// Nodes inside subgraphs run under a composite id ("outer:inner") and are not matched (no chart updates).
//
// Storage: at most MAX_POINTS points per node. When the series grows past that, neighbouring pairs are
// merged (mean loss, the later step and EMA) and the bucket size doubles, so the whole run stays visible
// at a coarser resolution; later steps are averaged into buckets of the current size before they are stored.
//
// For tests, the chart canvas carries data-cinetune-chart="loss", data-node-id, data-points (stored points
// plus a partly filled bucket), data-last-step, data-run, data-status and data-terms (the loss parts drawn, comma
// separated), refreshed on every redraw.
// The only global is window.cinetune.lossChart ({liveCount(), maxPoints}).

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const NODE_CLASSES = new Set(["CinetuneK5TrainLoRA", "CinetuneLTX2TrainLoRA"]);
const WIDGET_NAME = "loss_chart";
const WIDGET_TYPE = "cinetune_loss_chart";
const PROGRESS_EVENT = "cinetune.train.progress";
const STATUS_EVENT = "cinetune.train.status";
const MAX_POINTS = 5000;
const MIN_HEIGHT = 170;

const COLORS = {
    background: "#14171c",
    grid: "rgba(255, 255, 255, 0.09)",
    axisText: "#9aa3ad",
    loss: "rgba(102, 178, 255, 0.55)",
    ema: "#ffb347",
    checkpoint: "rgba(140, 220, 140, 0.55)",
    empty: "#6b737c",
};
// Loss parts by name; other names take the spare colours in order.
const TERM_COLORS = { video: "#7ee787", audio: "#d2a8ff" };
const SPARE_TERM_COLORS = ["#ff7b72", "#79c0ff", "#e3b341"];

const liveCharts = new Set();

/** Loss points with bounded size: steps, loss and EMA in parallel arrays, merged pairwise on overflow. */
class LossSeries {
    constructor(maxPoints) {
        this.maxPoints = maxPoints;
        this.clear();
    }

    clear() {
        this.steps = [];
        this.loss = [];
        this.ema = [];
        this.terms = {}; // loss part name -> values parallel to steps (NaN where a step lacks the part)
        this.bucketSize = 1;
        this.pending = null; // {n, lossSum, step, ema, termSums, termCounts}: a bucket being filled (bucketSize > 1)
    }

    get termNames() {
        return Object.keys(this.terms);
    }

    get lastStep() {
        if (this.pending) return this.pending.step;
        return this.steps.length ? this.steps[this.steps.length - 1] : null;
    }

    /** Points to draw: stored ones plus the partly filled bucket. */
    get length() {
        return this.steps.length + (this.pending ? 1 : 0);
    }

    /** Adds one step; `terms` maps loss part names to finite values (may be empty). */
    add(step, loss, ema, terms = {}) {
        if (this.lastStep !== null && step <= this.lastStep) this.truncateFrom(step);
        if (this.bucketSize === 1) {
            this._push(step, loss, ema, terms);
        } else {
            const p = this.pending ?? (this.pending = { n: 0, lossSum: 0, step, ema, termSums: {}, termCounts: {} });
            p.n += 1;
            p.lossSum += loss;
            p.step = step;
            p.ema = ema;
            for (const [name, value] of Object.entries(terms)) {
                p.termSums[name] = (p.termSums[name] ?? 0) + value;
                p.termCounts[name] = (p.termCounts[name] ?? 0) + 1;
            }
            if (p.n >= this.bucketSize) {
                this.pending = null;
                this._push(p.step, p.lossSum / p.n, p.ema, pendingTerms(p));
            }
        }
    }

    /** Forget every point at or after `step` (a run resumed from an earlier checkpoint). */
    truncateFrom(step) {
        if (this.pending && this.pending.step >= step) this.pending = null;
        let keep = this.steps.length;
        while (keep > 0 && this.steps[keep - 1] >= step) keep -= 1;
        this.steps.length = keep;
        this.loss.length = keep;
        this.ema.length = keep;
        for (const values of Object.values(this.terms)) values.length = keep;
    }

    _push(step, loss, ema, terms) {
        for (const name of Object.keys(terms)) {
            if (!this.terms[name]) this.terms[name] = new Array(this.steps.length).fill(NaN);
        }
        this.steps.push(step);
        this.loss.push(loss);
        this.ema.push(ema);
        for (const [name, values] of Object.entries(this.terms)) values.push(terms[name] ?? NaN);
        if (this.steps.length > this.maxPoints) this._halve();
    }

    _halve() {
        const steps = [], loss = [], ema = [];
        const n = this.steps.length;
        for (let i = 0; i + 1 < n; i += 2) {
            steps.push(this.steps[i + 1]);
            loss.push((this.loss[i] + this.loss[i + 1]) / 2);
            ema.push(this.ema[i + 1]);
        }
        if (n % 2 === 1) {
            steps.push(this.steps[n - 1]);
            loss.push(this.loss[n - 1]);
            ema.push(this.ema[n - 1]);
        }
        this.steps = steps;
        this.loss = loss;
        this.ema = ema;
        for (const [name, values] of Object.entries(this.terms)) {
            const merged = [];
            for (let i = 0; i + 1 < n; i += 2) merged.push(meanOfFinite(values[i], values[i + 1]));
            if (n % 2 === 1) merged.push(values[n - 1]);
            this.terms[name] = merged;
        }
        this.bucketSize *= 2;
    }

    /** Calls fn(step, value) for every point of loss part `name` that has a value, in step order. */
    forEachTerm(name, fn) {
        const values = this.terms[name] ?? [];
        for (let i = 0; i < this.steps.length; i++) if (finite(values[i])) fn(this.steps[i], values[i]);
        const p = this.pending;
        if (p && p.termCounts[name]) fn(p.step, p.termSums[name] / p.termCounts[name]);
    }

    /** Calls fn(step, loss, ema) for every point to draw, in step order. */
    forEach(fn) {
        for (let i = 0; i < this.steps.length; i++) fn(this.steps[i], this.loss[i], this.ema[i]);
        if (this.pending) fn(this.pending.step, this.pending.lossSum / this.pending.n, this.pending.ema);
    }
}

function finite(value) {
    return typeof value === "number" && Number.isFinite(value);
}

function meanOfFinite(a, b) {
    if (finite(a) && finite(b)) return (a + b) / 2;
    return finite(a) ? a : b;
}

function pendingTerms(p) {
    const terms = {};
    for (const name of Object.keys(p.termSums)) terms[name] = p.termSums[name] / p.termCounts[name];
    return terms;
}

/** The finite parts of an event's loss_terms, as {name: value}. */
function lossTerms(data) {
    const terms = {};
    if (data && typeof data.loss_terms === "object" && data.loss_terms !== null) {
        for (const [name, value] of Object.entries(data.loss_terms)) if (finite(value)) terms[name] = value;
    }
    return terms;
}

function termColor(name, index) {
    return TERM_COLORS[name] ?? SPARE_TERM_COLORS[index % SPARE_TERM_COLORS.length];
}

function formatNumber(value, digits = 4) {
    if (!finite(value)) return "–";
    const abs = Math.abs(value);
    if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
    return value.toPrecision(digits);
}

function formatDuration(seconds) {
    if (!finite(seconds) || seconds < 0) return "–";
    const s = Math.round(seconds);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m > 0) return `${m}m ${String(sec).padStart(2, "0")}s`;
    return `${sec}s`;
}

/** Upper bound for the y axis that ignores rare spikes: the 99th percentile of the loss, at least the EMA max. */
function robustMax(values, emaMax) {
    if (values.length < 100) return Math.max(emaMax, ...values);
    const sorted = Float64Array.from(values).sort();
    return Math.max(emaMax, sorted[Math.floor(0.99 * (sorted.length - 1))]);
}

class LossChart {
    constructor(node) {
        this.node = node;
        this.series = new LossSeries(MAX_POINTS);
        this.run = null;
        this.promptId = null;
        this.latest = null; // the last progress event
        this.status = null; // the last status event
        this.checkpoints = [];
        this.frame = 0;
        this.disposed = false;

        this.element = document.createElement("div");
        this.element.className = "cinetune-loss-chart";
        Object.assign(this.element.style, {
            display: "flex", flexDirection: "column", gap: "2px", width: "100%", height: "100%",
            boxSizing: "border-box", pointerEvents: "none", // drags and wheel zoom go to the graph canvas
        });
        this.canvas = document.createElement("canvas");
        this.canvas.dataset.cinetuneChart = "loss";
        Object.assign(this.canvas.style, {
            flex: "1 1 auto", minHeight: "0", width: "100%", borderRadius: "4px", background: COLORS.background,
        });
        this.readout = document.createElement("div");
        this.readout.className = "cinetune-loss-readout";
        Object.assign(this.readout.style, {
            flex: "0 0 auto", font: "11px monospace", color: "var(--input-text, #ddd)", whiteSpace: "nowrap",
            overflow: "hidden", textOverflow: "ellipsis", lineHeight: "16px",
        });
        this.element.append(this.canvas, this.readout);

        this.onProgress = (event) => this.handleProgress(event.detail);
        this.onStatus = (event) => this.handleStatus(event.detail);
        api.addEventListener(PROGRESS_EVENT, this.onProgress);
        api.addEventListener(STATUS_EVENT, this.onStatus);

        this.resizeObserver = typeof ResizeObserver === "function" ? new ResizeObserver(() => this.schedule()) : null;
        this.resizeObserver?.observe(this.canvas);
        liveCharts.add(this);
        this.schedule();
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
        this.latest = null;
        this.status = null;
        this.run = run ?? null;
        this.promptId = promptId ?? null;
    }

    handleProgress(data) {
        if (!this.matches(data) || !finite(data.step)) return;
        if (this.isNewRun(data)) this.reset(data.run, data.prompt_id);
        if (finite(data.loss)) {
            this.series.add(data.step, data.loss, finite(data.loss_ema) ? data.loss_ema : data.loss, lossTerms(data));
        }
        this.latest = data;
        this.schedule();
    }

    handleStatus(data) {
        if (!this.matches(data)) return;
        if (data.status === "started" || this.isNewRun(data)) {
            this.reset(data.run, data.prompt_id);
        }
        if (data.status === "checkpoint" && finite(data.step)) this.checkpoints.push(data.step);
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

    readoutText() {
        const d = this.latest;
        const ended = this.status && (this.status.status === "finished" || this.status.status === "interrupted");
        const status = ended ? ` · ${this.status.status}` : "";
        if (!d) return this.status ? `${this.status.status}: ${this.status.message ?? ""}` : "waiting for training";
        const lr = finite(d.lr) ? d.lr.toExponential(2) : "–";
        const speed = finite(d.steps_per_s) ? d.steps_per_s.toFixed(2) : "–";
        const parts = Object.entries(lossTerms(d)).map(([name, value]) => ` · ${name} ${formatNumber(value)}`).join("");
        return `step ${d.step}/${d.max_steps ?? "?"} · loss ${formatNumber(d.loss)} · ema ${formatNumber(d.loss_ema)}`
            + `${parts} · lr ${lr} · ${speed} it/s · ETA ${formatDuration(d.eta_s)}${status}`;
    }

    draw() {
        if (this.disposed) return;
        const series = this.series;
        const ds = this.canvas.dataset;
        ds.nodeId = String(this.node.id);
        ds.points = String(series.length);
        ds.lastStep = series.lastStep === null ? "" : String(series.lastStep);
        ds.run = this.run ?? "";
        ds.status = this.status?.status ?? "";
        ds.terms = series.termNames.join(",");
        const text = this.readoutText();
        if (this.readout.textContent !== text) this.readout.textContent = text;

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
        ctx.font = "10px sans-serif";

        if (series.length === 0) {
            ctx.fillStyle = COLORS.empty;
            ctx.textAlign = "center";
            ctx.textBaseline = "middle";
            ctx.fillText("loss chart: waiting for training steps", cssWidth / 2, cssHeight / 2);
            return;
        }

        const steps = [], losses = [];
        let emaMin = Infinity, emaMax = -Infinity;
        series.forEach((step, loss, ema) => {
            steps.push(step);
            losses.push(loss);
            emaMin = Math.min(emaMin, ema);
            emaMax = Math.max(emaMax, ema);
        });
        const termNames = series.termNames;
        let termMin = Infinity, termMax = -Infinity;
        for (const name of termNames) {
            series.forEachTerm(name, (_step, value) => {
                termMin = Math.min(termMin, value);
                termMax = Math.max(termMax, value);
            });
        }
        let yMin = Math.min(emaMin, termMin, ...losses);
        let yMax = robustMax(losses, Math.max(emaMax, termMax));
        if (!(yMax > yMin)) {
            const half = Math.abs(yMax) * 0.5 || 1;
            yMin -= half;
            yMax += half;
        }
        const pad = (yMax - yMin) * 0.06;
        yMin -= pad;
        yMax += pad;
        const xMin = Math.min(steps[0], 0);
        const maxSteps = this.latest && finite(this.latest.max_steps) ? this.latest.max_steps : 0;
        const xMax = Math.max(steps[steps.length - 1], maxSteps, xMin + 1);

        const left = 46, right = 8, top = 6, bottom = 16;
        const plotW = Math.max(1, cssWidth - left - right), plotH = Math.max(1, cssHeight - top - bottom);
        const px = (step) => left + ((step - xMin) / (xMax - xMin)) * plotW;
        const py = (value) => top + (1 - (Math.min(value, yMax) - yMin) / (yMax - yMin)) * plotH;

        // Grid and axis labels.
        ctx.strokeStyle = COLORS.grid;
        ctx.fillStyle = COLORS.axisText;
        ctx.lineWidth = 1;
        ctx.textAlign = "right";
        ctx.textBaseline = "middle";
        const rows = 4;
        for (let i = 0; i <= rows; i++) {
            const value = yMin + ((yMax - yMin) * i) / rows;
            const y = Math.round(py(value)) + 0.5;
            ctx.beginPath();
            ctx.moveTo(left, y);
            ctx.lineTo(left + plotW, y);
            ctx.stroke();
            ctx.fillText(formatNumber(value, 3), left - 4, y);
        }
        ctx.textBaseline = "top";
        ctx.textAlign = "left";
        ctx.fillText(String(xMin), left, top + plotH + 3);
        ctx.textAlign = "right";
        ctx.fillText(String(xMax), left + plotW, top + plotH + 3);

        // Checkpoints as vertical markers.
        ctx.strokeStyle = COLORS.checkpoint;
        ctx.setLineDash([3, 3]);
        for (const step of this.checkpoints) {
            const x = Math.round(px(step)) + 0.5;
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + plotH);
            ctx.stroke();
        }
        ctx.setLineDash([]);

        // Loss as points (a thin line joins them while they are sparse).
        ctx.fillStyle = COLORS.loss;
        ctx.strokeStyle = COLORS.loss;
        const sparse = steps.length <= plotW / 3;
        if (sparse) {
            ctx.beginPath();
            for (let i = 0; i < steps.length; i++) {
                const x = px(steps[i]), y = py(losses[i]);
                if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
            }
            ctx.stroke();
        }
        const r = sparse ? 2 : 1.2;
        for (let i = 0; i < steps.length; i++) {
            ctx.fillRect(px(steps[i]) - r, py(losses[i]) - r, 2 * r, 2 * r);
        }

        // EMA as a line.
        ctx.strokeStyle = COLORS.ema;
        ctx.lineWidth = 2;
        ctx.beginPath();
        let first = true;
        series.forEach((step, _loss, ema) => {
            const x = px(step), y = py(ema);
            if (first) ctx.moveTo(x, y); else ctx.lineTo(x, y);
            first = false;
        });
        ctx.stroke();

        // Loss parts (e.g. video and audio) as thin lines, with a legend in the top right corner.
        ctx.lineWidth = 1.5;
        termNames.forEach((name, index) => {
            ctx.strokeStyle = termColor(name, index);
            ctx.beginPath();
            let start = true;
            series.forEachTerm(name, (step, value) => {
                const x = px(step), y = py(value);
                if (start) ctx.moveTo(x, y); else ctx.lineTo(x, y);
                start = false;
            });
            ctx.stroke();
        });
        if (termNames.length) {
            const legend = [["loss", COLORS.loss], ["ema", COLORS.ema],
                ...termNames.map((name, index) => [name, termColor(name, index)])];
            ctx.textAlign = "right";
            ctx.textBaseline = "top";
            let x = left + plotW - 4;
            for (let i = legend.length - 1; i >= 0; i--) {
                const [label, color] = legend[i];
                ctx.fillStyle = color;
                ctx.fillText(label, x, top + 3);
                x -= ctx.measureText(label).width + 10;
            }
        }
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
        getMinHeight: () => MIN_HEIGHT,
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

    const [width, height] = node.size;
    node.setSize([Math.max(width, 420), Math.max(height, node.computeSize()[1])]);
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
        node.cinetuneLossChart?.schedule(); // the node has its saved id now
    },
});
