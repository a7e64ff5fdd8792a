// uPlot glue: the options of one overlay chart, zoom by drag, pinch and
// double-click, and a chart saved as PNG. DOM-bound (uPlot needs a canvas), so
// tested in the browser tests; the data it draws is shaped by series.js.

import uPlot from "./vendor/uplot/uPlot.esm.js";
import { formatClockTicks, formatTicks } from "./charts.js";
import { lonePoints } from "./series.js";

export const CHART_HEIGHT = 200;

/** Opacity of the raw line drawn behind a smoothed one. */
const RAW_ALPHA = 0.25;

export function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/** `#rrggbb` (or any colour the canvas knows) at an opacity, for the faint raw line. */
function withAlpha(colour, alpha) {
  const m = /^#([0-9a-f]{6})$/i.exec(colour);
  if (m === null) return colour;
  const n = parseInt(m[1], 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

/**
 * uPlot axis size that fits the longest tick label (after uPlot's autosize
 * demo). uPlot lays out in up to 3 cycles; the first may see splits for a
 * stale plot height, so measure in cycles 1 and 2 and keep the size in the
 * last one.
 */
function axisSize(u, values, axisIdx, cycleNum) {
  const axis = u.axes[axisIdx];
  if (cycleNum > 2) return axis._size;
  let size = axis.ticks.size + axis.gap;
  const longest = (values ?? []).reduce((acc, v) => (v.length > acc.length ? v : acc), "");
  if (longest !== "") {
    u.ctx.font = axis.font[0];
    size += u.ctx.measureText(longest).width / devicePixelRatio;
  }
  return Math.ceil(size);
}

const refits = new WeakMap();

/** After a draw, lay out once more if the y tick labels do not fit (see axisSize). */
function fitYAxis(u) {
  const axis = u.axes[1];
  if (!axis._show || !axis._values) return;
  if (axisSize(u, axis._values, 1, 1) <= axis._size) {
    refits.delete(u);
    return;
  }
  const count = refits.get(u) ?? 0;
  if (count >= 2) return;
  refits.set(u, count + 1);
  queueMicrotask(() => u.setSize({ width: u.width, height: u.height }));
}

const valueTicks = (u, splits) => formatTicks(splits);

/**
 * Room per x tick (CSS px) for step labels: as wide as a label at the precision
 * formatTicks will need, plus a gap. uPlot's fixed 50 px overlapped the labels of a
 * zoom past a million steps (1.00015e+6).
 */
function stepSpace(u, axisIdx, min, max, dim) {
  if (!(max > min) || !(dim > 0)) return 50;
  const labels = formatTicks([min, min + ((max - min) * 50) / dim, max]);
  u.ctx.font = u.axes[axisIdx].font[0];
  const widest = Math.max(...labels.map((label) => u.ctx.measureText(label).width / devicePixelRatio));
  return Math.max(50, Math.ceil(widest) + 16);
}

/**
 * uPlot's own y range, unless its rounding collapses it to one value. uPlot snaps
 * the padded range with a rounding that takes six repeated digits for float noise:
 * a float32 metric one ulp either side of 1 (0.99999994 and 1) got the range [1, 1],
 * and laying out its ticks then looped until Chromium threw (7 s of frozen page, an
 * empty chart, again at each redraw). Such data is drawn flat, as uPlot draws a
 * constant.
 */
function yRange(u, min, max) {
  if (min === null || max === null) return [min, max];
  const range = uPlot.rangeNum(min, max, 0.1, true);
  if (range[1] > range[0]) return range;
  const flat = uPlot.rangeNum(max, max, 0.1, true);
  return flat[1] > flat[0] ? flat : [max - 1, max + 1];
}

/**
 * Options of one chart.
 *
 * @param {{
 *   width: number,
 *   runs: {label: string, colour: string}[],   one entry per run, in column order
 *   smoothed: boolean,      two columns per run (raw, faint; then smoothed)
 *   log: boolean,
 *   xMode: "step"|"wall"|"relative",
 *   onZoom: (min: number, max: number) => void,
 *   onReset: () => void,
 *   onCursor: (u: uPlot) => void,
 * }} spec
 */
/** uPlot's points.filter: dots for the points a line cannot show (lonePoints). */
function dotLonePoints(u, seriesIdx) {
  const [i0, i1] = u.series[0].idxs ?? [0, u.data[0].length - 1];
  return lonePoints(u.data[seriesIdx], i0, i1);
}

export function plotOptions(spec) {
  const axisColour = cssVar("--axis");
  const gridColour = cssVar("--grid");
  const axis = {
    stroke: axisColour,
    grid: { stroke: gridColour, width: 1 },
    ticks: { stroke: gridColour, width: 1 },
  };
  const series = [{ label: spec.xMode }];
  for (const run of spec.runs) {
    if (spec.smoothed) {
      series.push({ label: `${run.label} (raw)`, stroke: withAlpha(run.colour, RAW_ALPHA), width: 1, points: { show: false } });
    }
    // Width 1: Skia draws hairlines on a fast path; a 1.5 px stroke is a filled outline
    // and, with eight runs live, several times the raster work of the whole frame.
    series.push({ label: run.label, stroke: run.colour, width: 1, points: { show: false, filter: dotLonePoints, size: 6, fill: run.colour } });
  }
  const xAxis = { ...axis, size: 36 };
  if (spec.xMode === "relative") xAxis.values = (u, splits) => formatClockTicks(splits);
  else if (spec.xMode === "step") Object.assign(xAxis, { values: valueTicks, space: stepSpace });
  return {
    width: spec.width,
    height: CHART_HEIGHT,
    legend: { show: false },
    cursor: {
      drag: { x: true, y: false, setScale: false },
      sync: { key: "trainwire" },
      points: { show: false },
    },
    scales: { x: { time: spec.xMode === "wall" }, y: spec.log ? { distr: 3 } : { range: yRange } },
    series,
    axes: [xAxis, { ...axis, size: axisSize, values: valueTicks }],
    hooks: {
      draw: [fitYAxis],
      setCursor: [spec.onCursor],
      setSelect: [
        (u) => {
          const { left, width } = u.select;
          if (width < 3) return;
          const min = u.posToVal(left, "x");
          const max = u.posToVal(left + width, "x");
          u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
          spec.onZoom(min, max);
        },
      ],
      ready: [
        (u) => {
          u.over.addEventListener("dblclick", () => spec.onReset());
          touchZoom(u, spec);
        },
      ],
    },
  };
}

/**
 * Touch: one finger shows the cursor (and tooltip); two fingers pinch to zoom
 * the x axis, applied when the fingers lift; a double tap resets.
 */
function touchZoom(u, spec) {
  const over = u.over;
  let pinch = null;
  let lastTap = 0;
  const localX = (touch) => touch.clientX - over.getBoundingClientRect().left;
  over.addEventListener(
    "touchstart",
    (e) => {
      if (e.touches.length === 2) {
        const a = localX(e.touches[0]);
        const b = localX(e.touches[1]);
        pinch = {
          span: Math.max(10, Math.abs(a - b)),
          centre: u.posToVal((a + b) / 2, "x"),
          min: u.scales.x.min,
          max: u.scales.x.max,
          next: null,
        };
        e.preventDefault();
      } else if (e.touches.length === 1) {
        const now = performance.now();
        if (now - lastTap < 300) spec.onReset();
        lastTap = now;
      }
    },
    { passive: false },
  );
  over.addEventListener(
    "touchmove",
    (e) => {
      if (pinch !== null && e.touches.length === 2) {
        const a = localX(e.touches[0]);
        const b = localX(e.touches[1]);
        const factor = pinch.span / Math.max(10, Math.abs(a - b));
        const half = ((pinch.max - pinch.min) * factor) / 2;
        pinch.next = [pinch.centre - half, pinch.centre + half];
        u.setScale("x", { min: pinch.next[0], max: pinch.next[1] });
        e.preventDefault();
      } else if (e.touches.length === 1) {
        const t = e.touches[0];
        const rect = over.getBoundingClientRect();
        u.setCursor({ left: t.clientX - rect.left, top: t.clientY - rect.top });
      }
    },
    { passive: false },
  );
  over.addEventListener("touchend", (e) => {
    if (pinch !== null && e.touches.length < 2) {
      const next = pinch.next;
      pinch = null;
      if (next !== null) spec.onZoom(next[0], next[1]);
    }
  });
}

/**
 * Save a chart as PNG: its title, the plot (axes included) and a legend of its
 * runs, on the theme's background.
 *
 * @param {uPlot} u
 * @param {string} title
 * @param {{label: string, colour: string}[]} runs
 * @param {string} filename
 */
export function savePng(u, title, runs, filename) {
  const plot = u.ctx.canvas;
  const ratio = plot.width / u.width;
  const pad = 12 * ratio;
  const line = 18 * ratio;
  const canvas = document.createElement("canvas");
  canvas.width = plot.width + 2 * pad;
  canvas.height = plot.height + 2 * pad + line * (1 + runs.length);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = cssVar("--panel") || "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = cssVar("--fg") || "#000";
  ctx.font = `600 ${13 * ratio}px ${cssVar("--font") || "sans-serif"}`;
  ctx.textBaseline = "top";
  ctx.fillText(title, pad, pad);
  ctx.drawImage(plot, pad, pad + line);
  ctx.font = `${12 * ratio}px ${cssVar("--font") || "sans-serif"}`;
  runs.forEach((run, i) => {
    const y = pad + line + plot.height + i * line + 4 * ratio;
    ctx.fillStyle = run.colour;
    ctx.fillRect(pad, y + 4 * ratio, 14 * ratio, 3 * ratio);
    ctx.fillStyle = cssVar("--fg") || "#000";
    ctx.fillText(run.label, pad + 20 * ratio, y);
  });
  canvas.toBlob((blob) => {
    if (blob === null) return;
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = filename;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }, "image/png");
}

export { uPlot };
