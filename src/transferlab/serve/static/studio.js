// The project pages: make a dataset (classes, files, camera bursts), train it, follow the queue live. Plain JavaScript.
"use strict";

const enc = (name) => name.split("/").map(encodeURIComponent).join("/");
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};
const say = (text, bad = false) => {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = bad ? "message error" : "message";
};
const minutes = (s) => (s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`);

// Every request as JSON; a refusal is one line, shown on the page.
async function call(url, options = {}) {
  if (options.json !== undefined) {
    options.body = JSON.stringify(options.json);
    options.headers = { "Content-Type": "application/json" };
  }
  const response = await fetch(url, options);
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

// The files of a drop, the images inside dropped folders included (at any depth).
async function dropped(transfer) {
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  if (!entries.length) return [...transfer.files];
  const files = [];
  const walk = async (entry) => {
    if (entry.isFile) {
      const file = await new Promise((done, fail) => entry.file(done, fail));
      if (file.type.startsWith("image/")) files.push(file);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {  // a directory reader answers in batches until an empty one
        const batch = await new Promise((done, fail) => reader.readEntries(done, fail));
        if (!batch.length) break;
        for (const child of batch) await walk(child);
      }
    }
  };
  for (const entry of entries) await walk(entry);
  return files;
}

// The projects page: a new project from a name and comma-separated classes.
function newProject() {
  const form = document.getElementById("new-project");
  if (!form) return;
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const name = document.getElementById("project-name").value.trim();
    const classes = document.getElementById("project-classes").value.split(",").map((c) => c.trim()).filter(Boolean);
    try {
      await call("/api/projects", { method: "POST", json: { name, classes } });
      location.href = `/projects/${encodeURIComponent(name)}`;
    } catch (error) {
      say(error.message, true);
    }
  });
}

function projectPage() {
  const root = document.getElementById("project");
  if (!root) return;
  const name = root.dataset.name;
  const api = `/api/projects/${encodeURIComponent(name)}`;
  const maxFiles = Number(root.dataset.maxFiles);
  let camera = null;

  const render = (project) => {
    const cards = Object.entries(project.classes).map(([klass, files]) => classCard(klass, files));
    document.getElementById("classes").replaceChildren(...cards);
  };

  const upload = async (klass, files) => {
    files = [...files];
    try {
      for (let i = 0; i < files.length; i += maxFiles) {  // the server takes so many per request
        const body = new FormData();
        for (const f of files.slice(i, i + maxFiles)) body.append("images", f, f.name);
        say(`adding ${files.length} image(s) to ${klass}…`);
        render(await call(`${api}/classes/${encodeURIComponent(klass)}/images`, { method: "POST", body }));
      }
      say(`added ${files.length} image(s) to ${klass}`);
    } catch (error) {
      say(error.message, true);
    }
  };

  const burst = async (klass) => {
    const video = document.getElementById("camera");
    if (!camera) return say("start the camera first", true);
    const count = Number(document.getElementById("burst").value);
    const canvas = el("canvas", { width: video.videoWidth, height: video.videoHeight });
    const frames = [];
    for (let i = 0; i < count; i++) {
      canvas.getContext("2d").drawImage(video, 0, 0);
      const blob = await new Promise((done) => canvas.toBlob(done, "image/jpeg", 0.92));
      frames.push(new File([blob], `camera-${Date.now()}-${i}.jpg`, { type: "image/jpeg" }));
      await new Promise((done) => setTimeout(done, 120));
    }
    await upload(klass, frames);
  };

  const classCard = (klass, files) => {
    const path = `${api}/classes/${encodeURIComponent(klass)}`;
    const input = el("input", { type: "file", accept: "image/*", multiple: true, hidden: true });
    input.addEventListener("change", () => upload(klass, input.files));
    const folder = el("input", { type: "file", multiple: true, hidden: true, webkitdirectory: true, className: "folder" });
    folder.addEventListener("change", () => upload(klass, [...folder.files].filter((f) => f.type.startsWith("image/"))));
    const rename = el("button", { type: "button", textContent: "rename", className: "rename" });
    rename.addEventListener("click", async () => {
      const to = prompt(`rename ${klass} to`, klass);
      if (!to || to === klass) return;
      try { render(await call(`${path}/rename`, { method: "POST", json: { to } })); } catch (error) { say(error.message, true); }
    });
    const remove = el("button", { type: "button", textContent: "delete", className: "delete" });
    remove.addEventListener("click", async () => {
      if (!confirm(`delete ${klass} and its ${files.length} images?`)) return;
      try { render(await call(path, { method: "DELETE" })); } catch (error) { say(error.message, true); }
    });
    const capture = el("button", { type: "button", textContent: "capture burst", className: "capture" });
    capture.addEventListener("click", () => burst(klass));
    const choose = el("button", { type: "button", textContent: "add files", className: "choose-files" });
    choose.addEventListener("click", () => input.click());
    const chooseFolder = el("button", { type: "button", textContent: "add a folder", className: "choose-folder" });
    chooseFolder.addEventListener("click", () => folder.click());
    const thumbs = files.map((file) => {
      const x = el("button", { type: "button", textContent: "×", title: `remove ${file}`, className: "remove" });
      x.addEventListener("click", async () => {
        try { render(await call(`${path}/images/${encodeURIComponent(file)}`, { method: "DELETE" })); } catch (error) { say(error.message, true); }
      });
      const img = el("img", { src: `/project-files/${encodeURIComponent(name)}/${encodeURIComponent(klass)}/${encodeURIComponent(file)}`, alt: file, loading: "lazy" });
      return el("span", { className: "thumb" }, img, x);
    });
    const card = el("section", { className: "klass drop" },
      el("h3", {}, klass, " ", el("span", { className: "count", textContent: `${files.length} images` })),
      el("p", { className: "tools" }, choose, " ", chooseFolder, " ", capture, " ", rename, " ", remove, input, folder),
      el("div", { className: "thumbs" }, ...thumbs));
    card.dataset.class = klass;
    for (const kind of ["dragenter", "dragover"]) card.addEventListener(kind, (e) => { e.preventDefault(); card.classList.add("over"); });
    card.addEventListener("dragleave", () => card.classList.remove("over"));
    card.addEventListener("drop", async (e) => {
      e.preventDefault();
      card.classList.remove("over");
      upload(klass, await dropped(e.dataTransfer));
    });
    return card;
  };

  document.getElementById("camera-start").addEventListener("click", async () => {
    try {
      camera = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 } });
      const video = document.getElementById("camera");
      video.srcObject = camera;
      video.hidden = false;
      await video.play();
      say("camera on: press a class's “capture burst”");
    } catch (error) {
      say(`no camera: ${error.message}`, true);
    }
  });

  document.getElementById("add-class").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = document.getElementById("class-name");
    try {
      render(await call(`${api}/classes`, { method: "POST", json: { name: input.value } }));
      input.value = "";
    } catch (error) {
      say(error.message, true);
    }
  });

  const budget = document.getElementById("budget");
  const shown = () => { document.getElementById("budget-shown").textContent = minutes(Number(budget.value)); };
  budget.addEventListener("input", shown);
  shown();
  let following = null;  // the job id the live panel shows
  document.getElementById("train").addEventListener("submit", async (e) => {
    e.preventDefault();
    const json = { backbone: document.getElementById("backbone").value, budget_s: Number(budget.value) };
    const size = document.getElementById("image-size").value;
    if (size) json.image_size = Number(size);
    try {
      const job = await call(`${api}/train`, { method: "POST", json });
      following = job.id;
      say(`queued ${job.run} (job ${job.id})`);
    } catch (error) {
      say(error.message, true);
    }
  });

  const events = new EventSource("/api/jobs/events");
  events.onmessage = (message) => {
    const jobs = JSON.parse(message.data);
    queue(jobs);
    const mine = jobs.filter((j) => j.project === name && j.kind !== "export");
    const job = mine.find((j) => j.id === following) || mine.filter((j) => j.state === "running").pop() || mine.pop();
    if (job) live(job);
  };

  const queue = (jobs) => {
    const rows = jobs.slice().reverse().map((job) => {
      const actions = el("td");
      if (job.state === "queued" || job.state === "running") actions.append(action("cancel", `/api/jobs/${job.id}/cancel`));
      const latest = jobs.filter((j) => j.run === job.run).pop() === job;
      if (latest && job.kind !== "export" && (job.state === "cancelled" || job.state === "failed")) {
        actions.append(action("resume", `/api/runs/${enc(job.run)}/resume`, (j) => { following = j.id; }));
      }
      const where = job.state === "queued" ? `waiting, #${job.position}` : minutes(job.elapsed_s);
      const row = el("tr", {},
        el("td", { textContent: job.id }), el("td", {}, el("a", { href: `/runs/${enc(job.run)}`, textContent: job.run })),
        el("td", { textContent: job.kind }), el("td", {}, el("span", { className: `status ${job.state}`, textContent: job.state })),
        el("td", { textContent: where }), el("td", { className: "note", textContent: job.message }), actions);
      row.dataset.job = job.id;
      row.dataset.state = job.state;
      return row;
    });
    document.querySelector("#queue tbody").replaceChildren(...rows);
  };

  const action = (label, url, then = () => {}) => {
    const button = el("button", { type: "button", textContent: label, className: label });
    button.addEventListener("click", async () => {
      try { then(await call(url, { method: "POST" })); } catch (error) { say(error.message, true); }
    });
    return button;
  };

  const live = (job) => {
    const panel = document.getElementById("live");
    panel.hidden = false;
    panel.dataset.job = job.id;
    panel.dataset.state = job.state;
    const link = document.getElementById("live-run");
    link.textContent = job.run;
    link.href = `/runs/${enc(job.run)}`;
    const state = document.getElementById("live-state");
    state.textContent = job.state;
    state.className = `status ${job.state}`;
    const run = job.run_progress;
    const parts = [];
    if (job.state === "queued") parts.push(`waiting in the queue (#${job.position})`);
    if (run) {
      parts.push(run.epoch || run.phase === "closed-form head" ? `${run.phase.replace("_", " ")}, epoch ${run.epoch} of at most ${run.epochs_total}` : "starting: checking the images, computing their features once");
      if (run.best_val_accuracy !== null) parts.push(`best val accuracy ${run.best_val_accuracy.toFixed(3)}`);
    }
    if (job.left_s !== undefined) parts.push(`about ${minutes(job.left_s)} left`);
    document.getElementById("live-progress").textContent = parts.join(" · ");
    document.getElementById("live-message").textContent = job.message;
    curves(run ? run.history : []);
    const links = document.getElementById("live-links");
    if (job.state === "finished") {
      links.replaceChildren(el("a", { href: `/runs/${enc(job.run)}/predict`, textContent: "try it", id: "try-it" }), " · ",
        el("a", { href: `/runs/${enc(job.run)}`, textContent: "its page, exports" }));
    } else links.replaceChildren();
  };

  // Accuracy by epoch, training dashed and validation solid, a grey line where fine-tuning starts.
  const curves = (history) => {
    const svg = document.getElementById("live-curves");
    const ns = "http://www.w3.org/2000/svg";
    const node = (tag, attrs) => { const n = document.createElementNS(ns, tag); for (const k in attrs) n.setAttribute(k, attrs[k]); return n; };
    const [w, h, pad] = [600, 220, 30];
    const n = Math.max(history.length, 2);
    const x = (i) => pad + (i * (w - 2 * pad)) / (n - 1);
    const y = (v) => h - pad - v * (h - 2 * pad);
    const parts = [node("rect", { x: pad, y: pad, width: w - 2 * pad, height: h - 2 * pad, fill: "#fff", stroke: "#e4e7ec" })];
    for (const v of [0, 0.5, 1]) parts.push(Object.assign(node("text", { x: 2, y: y(v) + 4, "font-size": 11, fill: "#667085" }), { textContent: v.toFixed(1) }));
    const start = history.findIndex((r) => r.phase === "fine_tune");
    if (start > 0) parts.push(node("line", { x1: x(start - 0.5), x2: x(start - 0.5), y1: pad, y2: h - pad, stroke: "#98a2b3", "stroke-dasharray": "4 3" }));
    for (const [key, color, dash] of [["train_accuracy", "#98a2b3", "5 3"], ["val_accuracy", "#2f6fdf", ""]]) {
      const points = history.map((r, i) => (typeof r[key] === "number" ? `${x(i)},${y(r[key])}` : null)).filter(Boolean);
      if (points.length) parts.push(node("polyline", { points: points.join(" "), fill: "none", stroke: color, "stroke-width": 2, "stroke-dasharray": dash, class: key }));
    }
    svg.replaceChildren(...parts);
    svg.dataset.epochs = history.length;
  };

  render(JSON.parse(document.getElementById("project-data").textContent));
}

document.addEventListener("DOMContentLoaded", () => { newProject(); projectPage(); });
