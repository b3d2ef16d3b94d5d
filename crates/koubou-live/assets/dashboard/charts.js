// Tiny time-series charts on <canvas>: one line, filled beneath, y from 0 to the max seen.
'use strict';
window.Spark = class Spark {
  constructor(canvas, { capacity = 150, format = (v) => String(v) } = {}) {
    this.canvas = canvas;
    this.capacity = capacity;
    this.format = format;
    this.points = []; // [t, v|null]
  }
  push(t, v) {
    this.points.push([t, v]);
    if (this.points.length > this.capacity) this.points.shift();
  }
  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || c.width, h = c.clientHeight || c.height;
    if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    const g = c.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.documentElement);
    const color = css.getPropertyValue('--chart').trim() || '#c2410c';
    const muted = css.getPropertyValue('--muted').trim() || '#888';
    const vals = this.points.map((p) => p[1]).filter((v) => v != null);
    const max = Math.max(1e-9, ...vals);
    const n = this.capacity;
    const x = (i) => (i + (n - this.points.length)) * (w / (n - 1));
    const y = (v) => h - 4 - (v / max) * (h - 14);
    g.fillStyle = muted;
    g.font = '10px system-ui, sans-serif';
    g.fillText(this.format(max), 2, 10);
    if (!vals.length) return;
    g.beginPath();
    let started = false, first = 0, last = 0;
    this.points.forEach(([, v], i) => {
      if (v == null) return;
      if (!started) { g.moveTo(x(i), y(v)); first = i; started = true; } else g.lineTo(x(i), y(v));
      last = i;
    });
    g.strokeStyle = color;
    g.lineWidth = 1.5;
    g.stroke();
    g.lineTo(x(last), h); g.lineTo(x(first), h); g.closePath();
    g.globalAlpha = 0.15; g.fillStyle = color; g.fill(); g.globalAlpha = 1;
  }
};
