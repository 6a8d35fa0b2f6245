// Result viewer: the preview (8-bit, windowed as the model saw it) with the raw Grad-CAM
// grid drawn over it in the browser: bilinear upsampling, the Jet colour map, and a colour
// weight of opacity x heat, so cold areas stay grayscale (as on the Secondary Capture).
"use strict";
(function () {
  const canvas = document.getElementById("view");
  if (!canvas) return;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const slider = document.getElementById("opacity");
  const sliderValue = document.getElementById("opacity-value");
  const toggle = document.getElementById("overlay-on");
  let base = null; // Uint8ClampedArray RGBA of the preview
  let heat = null; // Float32Array, one heat per canvas pixel, 0-1
  let jet = null; // Uint8ClampedArray RGB per canvas pixel

  function jetColour(v) {
    // MATLAB/OpenCV Jet: blue -> cyan -> yellow -> red
    const r = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 3)));
    const g = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 2)));
    const b = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 1)));
    return [255 * r, 255 * g, 255 * b];
  }

  function upsample(grid, rows, cols, width, height) {
    // Pixel centres aligned as OpenCV's INTER_LINEAR does.
    const out = new Float32Array(width * height);
    for (let y = 0; y < height; y++) {
      const gy = Math.min(rows - 1, Math.max(0, (y + 0.5) * rows / height - 0.5));
      const y0 = Math.floor(gy), y1 = Math.min(rows - 1, y0 + 1), fy = gy - y0;
      for (let x = 0; x < width; x++) {
        const gx = Math.min(cols - 1, Math.max(0, (x + 0.5) * cols / width - 0.5));
        const x0 = Math.floor(gx), x1 = Math.min(cols - 1, x0 + 1), fx = gx - x0;
        const top = grid[y0 * cols + x0] * (1 - fx) + grid[y0 * cols + x1] * fx;
        const bottom = grid[y1 * cols + x0] * (1 - fx) + grid[y1 * cols + x1] * fx;
        out[y * width + x] = Math.min(1, Math.max(0, top * (1 - fy) + bottom * fy));
      }
    }
    return out;
  }

  function draw() {
    if (!base) return;
    const opacity = toggle.checked ? slider.value / 100 : 0;
    sliderValue.textContent = slider.value + "%";
    const img = ctx.createImageData(canvas.width, canvas.height);
    const px = img.data;
    for (let i = 0, n = canvas.width * canvas.height; i < n; i++) {
      const a = heat ? opacity * heat[i] : 0;
      const g = base[4 * i];
      px[4 * i] = g + a * (jet[3 * i] - g);
      px[4 * i + 1] = g + a * (jet[3 * i + 1] - g);
      px[4 * i + 2] = g + a * (jet[3 * i + 2] - g);
      px[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    canvas.dataset.opacity = String(opacity);
  }

  const image = new Image();
  const gridRequest = fetch(canvas.dataset.grid, { credentials: "same-origin" }).then((r) => {
    if (!r.ok) throw new Error("grid " + r.status);
    return r.json();
  });
  image.onload = async function () {
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    ctx.drawImage(image, 0, 0);
    base = ctx.getImageData(0, 0, canvas.width, canvas.height).data.slice();
    try {
      const grid = await gridRequest;
      heat = upsample(grid.heat, grid.rows, grid.cols, canvas.width, canvas.height);
      jet = new Uint8ClampedArray(3 * heat.length);
      for (let i = 0; i < heat.length; i++) jet.set(jetColour(heat[i]), 3 * i);
    } catch (err) {
      toggle.disabled = true;
      slider.disabled = true;
    }
    document.getElementById("loading").hidden = true;
    draw();
    canvas.dataset.ready = "1";
  };
  image.onerror = function () {
    document.getElementById("loading").textContent = "The image is no longer stored.";
  };
  image.src = canvas.dataset.preview;

  slider.addEventListener("input", () => {
    if (!toggle.checked) toggle.checked = true;
    draw();
  });
  toggle.addEventListener("change", draw);
  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest("input[type=text], input[type=search], textarea")) return;
    if (ev.key === "h" || ev.key === "H") {
      toggle.checked = !toggle.checked;
      draw();
    }
  });
})();
