// The trial explorer: pick a trial by its axis values; draw its curves (SVG) and status.
// Data: the JSON block #explorer-data (format: analysis/explorer.py). No network, no library.
(function () {
  "use strict";
  var holder = document.getElementById("explorer-data");
  var root = document.getElementById("trial-explorer");
  if (!holder || !root) { return; }
  var data = JSON.parse(holder.textContent);
  var MISSING = 65535;
  var SVG = "http://www.w3.org/2000/svg";
  var n = data.trial.length;
  var index = new Map();
  for (var i = 0; i < n; i++) { index.set(keyOf(i), i); }

  function keyOf(t) { return data.codes.map(function (c) { return c[t]; }).join(","); }

  function make(tag, attrs, parent, ns) {
    var node = ns ? document.createElementNS(SVG, tag) : document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { node.textContent = attrs[k]; } else { node.setAttribute(k, attrs[k]); }
    });
    if (parent) { parent.appendChild(node); }
    return node;
  }

  // ------------------------------------------------------------------ controls
  var controls = root.querySelector(".explorer-controls");
  var selects = data.axes.map(function (axis) {
    var label = make("label", {}, controls);
    make("span", {text: axis.name}, label);
    var select = make("select", {"data-axis": axis.name}, label);
    axis.values.forEach(function (value, k) { make("option", {value: k, text: value}, select); });
    select.addEventListener("change", function () { show(fromSelects()); });
    return select;
  });
  var nav = make("div", {"class": "explorer-nav"}, controls);
  var prev = make("button", {type: "button", text: "◀ previous trial"}, nav);
  var next = make("button", {type: "button", text: "next trial ▶"}, nav);
  var jump = make("select", {"data-role": "status-jump"}, nav);
  make("option", {value: "", text: "next trial that ended…"}, jump);
  data.statuses.forEach(function (status, k) {
    var count = data.status.filter(function (s) { return s === k; }).length;
    make("option", {value: k, text: status + " (" + count + ")"}, jump);
  });
  var current = 0;
  prev.addEventListener("click", function () { show((current - 1 + n) % n); });
  next.addEventListener("click", function () { show((current + 1) % n); });
  jump.addEventListener("change", function () {
    var wanted = Number(jump.value);
    for (var step = 1; step <= n && jump.value !== ""; step++) {
      var t = (current + step) % n;
      if (data.status[t] === wanted) { show(t); break; }
    }
    jump.value = "";
  });

  function fromSelects() {
    var key = selects.map(function (s) { return s.value; }).join(",");
    return index.has(key) ? index.get(key) : -1;
  }

  // ------------------------------------------------------------------ decoding
  function decode(t) {
    var text = atob(data.curves[t]);
    var bytes = new Uint8Array(text.length);
    for (var k = 0; k < text.length; k++) { bytes[k] = text.charCodeAt(k); }
    var view = new DataView(bytes.buffer);
    var head = [];
    for (k = 0; k < 8; k++) { head.push(view.getFloat32(4 * k, true)); }
    var offset = 32;
    var nb = view.getUint16(offset, true), ne = view.getUint16(offset + 2, true);
    offset += 4;
    function values(count, lo, hi) {
      var out = [];
      for (var j = 0; j < count; j++) {
        var q = view.getUint16(offset + 2 * j, true);
        out.push(q === MISSING ? NaN : Math.pow(10, lo + (hi - lo) * q / (MISSING - 1)));
      }
      offset += 2 * count;
      return out;
    }
    var loss = values(2 * nb, head[0], head[1]);
    var grad = values(2 * nb, head[2], head[3]);
    var steps = [];
    for (k = 0; k < ne; k++) { steps.push(view.getUint32(offset + 4 * k, true)); }
    offset += 4 * ne;
    var train = values(ne, head[4], head[5]);
    var val = values(ne, head[4], head[5]);
    var width = head[6];
    var x = [];
    for (k = 0; k < nb; k++) { x.push(k * width + (width - 1) / 2); }
    return {x: x, width: width, divergence: head[7], loss: loss, grad: grad,
            steps: steps, train: train, val: val};
  }

  function band(x, pairs) {  // min, max per bucket
    var low = [], high = [];
    for (var k = 0; k < x.length; k++) { low.push(pairs[2 * k]); high.push(pairs[2 * k + 1]); }
    return {low: low, high: high};
  }

  // ------------------------------------------------------------------ drawing
  var W = 540, H = 310, M = {l: 62, r: 62, t: 46, b: 42};

  function logRange(arrays) {
    var lo = Infinity, hi = -Infinity;
    arrays.forEach(function (a) {
      a.forEach(function (v) { if (v > 0 && isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    });
    if (!isFinite(lo)) { return null; }
    if (hi / lo < 1.5) { lo /= 1.25; hi *= 1.25; }
    return [Math.log10(lo), Math.log10(hi)];
  }

  function fmt(v) {
    if (v === null || v === undefined) { return "–"; }
    if (v === "inf" || v === "-inf") { return v === "inf" ? "+∞" : "−∞"; }
    var a = Math.abs(v);
    return (a !== 0 && (a >= 1e4 || a < 1e-3)) ? v.toExponential(1) : String(Number(v.toPrecision(3)));
  }

  function ticks(range) {
    var out = [], lo = range[0], hi = range[1];
    var mult = (hi - lo) > 2.5 ? [1] : ((hi - lo) > 1 ? [1, 3] : [1, 2, 5]);
    var every = Math.max(1, Math.ceil((hi - lo) / 6));  // at most ~7 labelled decades
    for (var d = Math.floor(lo); d <= Math.ceil(hi); d++) {
      if (d % every !== 0) { continue; }
      mult.forEach(function (m) {
        var v = Math.log10(m) + d;
        if (v >= lo - 1e-9 && v <= hi + 1e-9) { out.push(v); }
      });
    }
    return out;
  }

  function chart(parent, title, maxStep, layers, divergence) {
    var svg = make("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H,
                           "class": "explorer-chart", role: "img", "aria-label": title},
                   parent, true);
    make("text", {x: M.l, y: 16, "font-size": 13, "font-weight": 600, text: title}, svg, true);
    var sx = function (s) { return M.l + (W - M.l - M.r) * s / Math.max(maxStep, 1); };
    var axes = {};
    layers.forEach(function (layer) {
      var side = layer.side || "left";
      if (!axes[side]) { axes[side] = []; }
      axes[side].push(layer.high || layer.y);
      if (layer.low) { axes[side].push(layer.low); }
    });
    var scales = {};
    Object.keys(axes).forEach(function (side) {
      var range = logRange(axes[side]);
      if (!range) { return; }
      var sy = function (v) {
        return H - M.b - (H - M.t - M.b) * (Math.log10(v) - range[0]) / (range[1] - range[0]);
      };
      scales[side] = sy;
      var x0 = side === "left" ? M.l : W - M.r;
      make("line", {x1: x0, x2: x0, y1: M.t, y2: H - M.b, stroke: "#888"}, svg, true);
      ticks(range).forEach(function (v) {
        var y = sy(Math.pow(10, v));
        if (side === "left") {
          make("line", {x1: M.l, x2: W - M.r, y1: y, y2: y, stroke: "#e6e6e6"}, svg, true);
        }
        make("text", {x: side === "left" ? x0 - 5 : x0 + 5, y: y + 4, "font-size": 11,
                      "text-anchor": side === "left" ? "end" : "start",
                      fill: side === "left" ? "#222" : "#666", text: fmt(Math.pow(10, v))},
             svg, true);
      });
    });
    make("line", {x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, stroke: "#888"}, svg, true);
    for (var k = 0; k <= 4; k++) {
      var s = Math.round(maxStep * k / 4);
      make("text", {x: sx(s), y: H - M.b + 15, "font-size": 11, "text-anchor": "middle",
                    text: String(s)}, svg, true);
    }
    make("text", {x: (M.l + W - M.r) / 2, y: H - 6, "font-size": 12, "text-anchor": "middle",
                  text: "step"}, svg, true);
    layers.forEach(function (layer) {
      var sy = scales[layer.side || "left"];
      if (!sy) { return; }
      runs(layer.x, layer.high || layer.y, layer.low).forEach(function (run) {
        if (layer.low && !layer.exact) {
          var top = run.map(function (p) { return sx(p[0]) + "," + sy(p[1]); });
          var bottom = run.slice().reverse().map(function (p) { return sx(p[0]) + "," + sy(p[2]); });
          make("polygon", {points: top.concat(bottom).join(" "), fill: layer.color,
                           "fill-opacity": 0.35, stroke: layer.color, "stroke-width": 0.6}, svg, true);
        } else {
          make("polyline", {points: run.map(function (p) { return sx(p[0]) + "," + sy(p[1]); }).join(" "),
                            fill: "none", stroke: layer.color, "stroke-width": layer.stroke || 1.2,
                            "stroke-dasharray": layer.dash || ""}, svg, true);
          if (layer.dots) {
            run.forEach(function (p) {
              make("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.2, fill: layer.color}, svg, true);
            });
          }
        }
      });
    });
    if (isFinite(divergence)) {
      var dx = sx(Math.min(divergence, maxStep));
      make("line", {x1: dx, x2: dx, y1: M.t, y2: H - M.b, stroke: "#000",
                    "stroke-dasharray": "2,3", "data-role": "divergence"}, svg, true);
    }
    var lx = M.l + 8;
    layers.forEach(function (layer) {
      make("rect", {x: lx, y: 29, width: 12, height: 4, fill: layer.color}, svg, true);
      var label = make("text", {x: lx + 16, y: 35, "font-size": 11, text: layer.label}, svg, true);
      lx += 24 + 6.2 * layer.label.length;
      return label;
    });
    return svg;
  }

  function runs(x, y, low) {  // consecutive finite points: [[x, y, low], ...]
    var out = [], run = [];
    for (var k = 0; k < x.length; k++) {
      if (y[k] > 0 && isFinite(y[k])) {
        run.push([x[k], y[k], low ? low[k] : y[k]]);
      } else if (run.length) { out.push(run); run = []; }
    }
    if (run.length) { out.push(run); }
    return out;
  }

  // ------------------------------------------------------------------ one trial
  var info = root.querySelector(".explorer-info");
  var plots = root.querySelector(".explorer-plots");

  function show(t) {
    plots.textContent = "";
    info.textContent = "";
    if (t < 0) {
      make("p", {"class": "note", "data-role": "missing",
                 text: "No trial has these values (the grid skips this combination)."}, info);
      return;
    }
    current = t;
    selects.forEach(function (select, a) { select.value = String(data.codes[a][t]); });
    var status = data.statuses[data.status[t]];
    var objective = data.objectives[data.objective[t]];
    var c = decode(t);
    var head = make("p", {"class": "explorer-head"}, info);
    make("strong", {text: "Trial " + data.trial[t]}, head);
    head.appendChild(document.createTextNode(" — status "));
    make("span", {"class": "status " + status, "data-role": "status", text: status}, head);
    if (isFinite(c.divergence)) {
      head.appendChild(document.createTextNode(" at step " + c.divergence));
    }
    head.appendChild(document.createTextNode(objective === "task" ? "" :
      " — trained on " + objective + " (minibatch objective on the right-hand axis)"));
    var list = make("dl", {"class": "explorer-metrics"}, info);
    data.metrics.forEach(function (m) {
      var item = make("div", {}, list);
      make("dt", {text: m.name}, item);
      make("dd", {"data-metric": m.name, text: fmt(m.values[t])}, item);
    });
    var maxStep = Math.max(c.x.length ? c.x[c.x.length - 1] + c.width / 2 : 0,
                           c.steps.length ? c.steps[c.steps.length - 1] : 0, 1);
    var loss = band(c.x, c.loss), grad = band(c.x, c.grad);
    var exact = c.width <= 1;
    var own = objective !== "task";
    chart(plots, "Loss (log scale)", maxStep, [
      {x: c.x, low: loss.low, high: loss.high, exact: exact, color: "#9a9a9a", stroke: 0.8,
       side: own ? "right" : "left",
       label: (own ? "minibatch " + objective : "minibatch") + (exact ? "" : " (min–max per " + c.width + " steps)")},
      {x: c.steps, y: c.train, color: "#1f4e9c", dots: true, label: "train"},
      {x: c.steps, y: c.val, color: "#c2571a", dash: "5,3", dots: true, label: "val"}
    ], c.divergence);
    chart(plots, "Gradient norm (log scale)", maxStep, [
      {x: c.x, low: grad.low, high: grad.high, exact: exact, color: "#555", stroke: 0.8,
       label: "minibatch" + (exact ? "" : " (min–max per " + c.width + " steps)")}
    ], c.divergence);
    root.setAttribute("data-trial", String(data.trial[t]));
  }

  show(0);
}());
