// Axis scales for the loss chart: tick values at round numbers ("nice numbers"), linear or logarithmic.
//
// A nice step is 1, 2, 2.5 or 5 times a power of ten (2.5 only where fractions are allowed), chosen so that about
// `target` ticks cover the range; the range is then widened to whole steps, so the grid starts and ends on a tick.
// Source of the method: P. S. Heckbert, "Nice numbers for graph labels", Graphics Gems (1990).
// A logarithmic scale ticks at powers of ten, adding 2× and 5× where the range spans few decades.
// This module has no side effects: the frontend also loads it as an extension, which then does nothing.

const NICE_FRACTIONS = [1, 2, 2.5, 5, 10];
const NICE_INTEGERS = [1, 2, 5, 10];

/** Round away float noise (0.30000000000000004 → 0.3). */
function clean(value) {
    return Number(value.toPrecision(12));
}

/** The nice step for `span` split into about `target` parts; `integer` keeps it a whole number ≥ 1. */
export function niceStep(span, target, integer = false) {
    const raw = Math.abs(span) / Math.max(1, target) || 1;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const fractions = integer && magnitude < 10 ? NICE_INTEGERS : NICE_FRACTIONS;
    const factor = fractions.find((f) => raw <= f * magnitude * (1 + 1e-9)) ?? 10;
    const step = clean(factor * magnitude);
    return integer ? Math.max(1, Math.round(step)) : step;
}

/**
 * A linear scale over [min, max] widened to whole nice steps.
 * Returns {min, max, step, ticks, log: false}; ticks are the multiples of `step` from min to max.
 */
export function linearScale(min, max, target = 5, integer = false) {
    if (!(max > min)) {
        const half = Math.abs(max) * 0.5 || 1;
        min -= half;
        max += half;
    }
    const step = niceStep(max - min, target, integer);
    const lo = clean(Math.floor(min / step + 1e-9) * step);
    const hi = clean(Math.ceil(max / step - 1e-9) * step);
    const ticks = [];
    for (let k = 0; lo + k * step <= hi + step * 1e-6 && k < 1000; k++) ticks.push(clean(lo + k * step));
    return { min: lo, max: hi, step, ticks, log: false };
}

/**
 * A base-10 logarithmic scale over [min, max] (both > 0), widened to the nearest 1, 2 or 5 × 10^k outside.
 * Returns {min, max, ticks, log: true}, or null when min is not positive (use a linear scale then).
 */
export function logScale(min, max) {
    if (!(min > 0) || !(max > 0)) return null;
    if (!(max > min)) {
        min /= 2;
        max *= 2;
    }
    const down = (v) => {
        const p = 10 ** Math.floor(Math.log10(v));
        return clean([5, 2, 1].map((f) => f * p).find((c) => c <= v * (1 + 1e-9)) ?? p);
    };
    const up = (v) => {
        const p = 10 ** Math.floor(Math.log10(v));
        return clean([1, 2, 5, 10].map((f) => f * p).find((c) => c >= v * (1 - 1e-9)));
    };
    const lo = down(min), hi = up(max);
    const decades = Math.log10(hi / lo);
    const factors = decades <= 2.5 ? [1, 2, 5] : [1];
    const ticks = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
        for (const f of factors) {
            const v = clean(f * 10 ** e);
            if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) ticks.push(v);
        }
    }
    return { min: lo, max: hi, ticks, log: true };
}

/** Tick label: the value's own digits (ticks are clean multiples of a nice step), exponent form when tiny or huge. */
export function formatTick(value) {
    if (value === 0) return "0";
    const abs = Math.abs(value);
    if (abs < 1e-3 || abs >= 1e5) return clean(value).toExponential().replace("e+", "e");
    return String(clean(value));
}
