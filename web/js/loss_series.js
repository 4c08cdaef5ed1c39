// Data of the loss chart: the loss series with a bounded number of points, and number formatting.
//
// LossSeries keeps at most `maxPoints` points. When the series grows past that, neighbouring pairs are merged (mean
// loss, the later step and EMA) and the bucket size doubles, so the whole run stays visible at a coarser resolution;
// later steps are averaged into buckets of the current size before they are stored. Named loss parts (LTX-2: video,
// audio) are kept beside the total, merged the same way.
// This module has no side effects: the frontend also loads it as an extension, which then does nothing.

/** Loss points with bounded size: steps, loss and EMA in parallel arrays, merged pairwise on overflow. */
export class LossSeries {
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

export function finite(value) {
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
export function lossTerms(data) {
    const terms = {};
    if (data && typeof data.loss_terms === "object" && data.loss_terms !== null) {
        for (const [name, value] of Object.entries(data.loss_terms)) if (finite(value)) terms[name] = value;
    }
    return terms;
}

export function formatNumber(value, digits = 4) {
    if (!finite(value)) return "–";
    const abs = Math.abs(value);
    if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
    return value.toPrecision(digits);
}

export function formatDuration(seconds) {
    if (!finite(seconds) || seconds < 0) return "–";
    const s = Math.round(seconds);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m > 0) return `${m}m ${String(sec).padStart(2, "0")}s`;
    return `${sec}s`;
}

/** Upper bound for the y axis that ignores rare spikes: the 99th percentile of the loss, at least the EMA max. */
export function robustMax(values, emaMax) {
    if (values.length < 100) return Math.max(emaMax, ...values);
    const sorted = Float64Array.from(values).sort();
    return Math.max(emaMax, sorted[Math.floor(0.99 * (sorted.length - 1))]);
}
