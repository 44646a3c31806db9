// transferlab's pages: live progress while a run trains, and drag-and-drop prediction. Plain JavaScript, no build.
"use strict";

const path = (name) => name.split("/").map(encodeURIComponent).join("/");

// Runs page: while any run trains, reload it every 10 s.
function watchRuns() {
  const table = document.getElementById("runs");
  if (table && Number(table.dataset.live) > 0) setTimeout(() => location.reload(), 10000);
}

// Run page: while the run trains, poll its summary; redraw progress and curves, reload once it finishes.
function watchRun() {
  const run = document.getElementById("run");
  if (!run || run.dataset.status !== "training") return;
  const poll = async () => {
    const response = await fetch(`/api/runs/${path(run.dataset.name)}`);
    if (!response.ok) return;
    const state = await response.json();
    if (state.status !== "training") return location.reload();
    document.querySelector("#status .progress").textContent =
      `epoch ${state.epoch} of ${state.epochs_total} (${state.phase.replace("_", " ")})`;
    if (state.best_val_accuracy !== null) document.getElementById("best").textContent = state.best_val_accuracy.toFixed(4);
    const curves = document.getElementById("curves");
    const src = `/files/${path(run.dataset.name)}/curves.png?v=${state.curves_version}`;
    if (state.curves_version && !curves) return location.reload();
    if (curves && !curves.src.endsWith(src)) curves.src = src;
    setTimeout(poll, 5000);
  };
  setTimeout(poll, 5000);
}

// Predict page: send dropped or chosen images to the API and draw the top-k classes of each as bars.
function predictForm() {
  const form = document.getElementById("predict");
  if (!form) return;
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  const message = document.getElementById("message");
  const results = document.getElementById("results");

  const send = async (files) => {
    if (!files.length) return;
    const body = new FormData();
    for (const f of files) body.append("images", f);
    const params = new URLSearchParams({ k: document.getElementById("k").value });
    const model = document.getElementById("model").value;
    if (model) params.set("model", model);
    message.textContent = `predicting ${files.length} image(s)…`;
    message.className = "message";
    const response = await fetch(`/api/runs/${path(form.dataset.name)}/predict?${params}`, { method: "POST", body });
    const answer = await response.json();
    if (!response.ok) {
      message.textContent = answer.error;
      message.className = "message error";
      return;
    }
    message.textContent = "";
    results.replaceChildren(...answer.map((result, i) => card(result, files[i])));
  };

  const card = (result, file) => {
    const box = document.createElement("section");
    box.className = "result";
    const picture = document.createElement("img");
    picture.src = URL.createObjectURL(file);
    picture.alt = result.image;
    const title = document.createElement("h3");
    title.textContent = result.image;
    const bars = result.top.map((t) => {
      const row = document.createElement("div");
      row.className = "row";
      row.innerHTML = '<span class="label"></span><span class="track"><span class="bar"></span></span><span class="prob"></span>';
      row.querySelector(".label").textContent = t.label;
      row.querySelector(".bar").style.width = `${(100 * t.prob).toFixed(1)}%`;
      row.querySelector(".prob").textContent = `${(100 * t.prob).toFixed(1)}%`;
      return row;
    });
    const text = document.createElement("div");
    if (result.unknown) {  // the run's "none of these": its score is under the run's threshold
      const badge = document.createElement("span");
      badge.className = "unknown";
      badge.textContent = "none of these";
      badge.title = `score ${result.score.toFixed(3)}, under the run's threshold`;
      title.append(" ", badge);
    }
    const extra = [];
    if (result.labels) {  // several labels per image: every class at or above its own threshold
      const chosen = document.createElement("p");
      chosen.className = "labels";
      chosen.textContent = "labels: " + (result.labels.map((t) => `${t.label} ${(100 * t.prob).toFixed(1)}%`).join(", ") || "none");
      extra.push(chosen);
      const above = new Set(result.labels.map((t) => t.index));
      result.top.forEach((t, i) => { if (above.has(t.index)) bars[i].classList.add("chosen"); });
    }
    text.append(title, ...extra, ...bars);
    box.append(picture, text);
    return box;
  };

  // The camera, live: a frame every second through the same prediction, while the button is on.
  const button = document.getElementById("live-camera");
  let stream = null;
  button.addEventListener("click", async () => {
    const video = document.getElementById("camera");
    if (stream) {
      stream.getTracks().forEach((t) => t.stop());
      stream = null;
      video.hidden = true;
      button.textContent = "try it live with the camera";
      return;
    }
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 } });
    } catch (error) {
      message.textContent = `no camera: ${error.message}`;
      message.className = "message error";
      return;
    }
    video.srcObject = stream;
    video.hidden = false;
    await video.play();
    button.textContent = "stop the camera";
    const canvas = document.createElement("canvas");
    const frame = async () => {
      if (!stream) return;
      [canvas.width, canvas.height] = [video.videoWidth, video.videoHeight];
      canvas.getContext("2d").drawImage(video, 0, 0);
      const blob = await new Promise((done) => canvas.toBlob(done, "image/jpeg", 0.92));
      await send([new File([blob], "camera.jpg", { type: "image/jpeg" })]);
      setTimeout(frame, 1000);
    };
    frame();
  });

  input.addEventListener("change", () => send([...input.files]));
  drop.addEventListener("click", (e) => { if (e.target === drop) input.click(); });
  for (const kind of ["dragenter", "dragover"]) drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    send([...e.dataTransfer.files]);
  });
}

// Review page: the review computes in the background; say what it does, show it when ready.
function watchReview() {
  const work = document.getElementById("review-work");
  if (!work || !work.dataset.name) return;
  const poll = async () => {
    const response = await fetch(`/api/runs/${path(work.dataset.name)}/review`);
    const state = await response.json();
    if (!response.ok || state.state !== "working") return location.reload();
    work.textContent = `Computing the review: ${state.step} (${state.elapsed_s} s so far). The page shows it when it is ready.`;
    setTimeout(poll, 1000);
  };
  setTimeout(poll, 1000);
}

// Run page: resume a stopped run; export a finished one and list the file when it is written.
function runActions() {
  const post = async (url) => {
    const response = await fetch(url, { method: "POST" });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error);
    return answer;
  };
  const resume = document.getElementById("resume");
  if (resume) resume.addEventListener("click", async () => {
    try { await post(`/api/runs/${path(resume.dataset.name)}/resume`); location.reload(); } catch (e) { resume.after(` ${e.message}`); }
  });
  const exports = document.getElementById("export");
  if (!exports) return;
  const said = document.getElementById("export-message");
  for (const button of exports.querySelectorAll("button")) button.addEventListener("click", async () => {
    try {
      const job = await post(`/api/runs/${path(exports.dataset.name)}/export?format=${button.dataset.format}`);
      const wait = async () => {
        const state = (await (await fetch("/api/jobs")).json()).find((j) => j.id === job.id);
        said.textContent = `${state.state}: ${state.message}`;
        if (state.state === "finished") return location.reload();
        if (state.state === "queued" || state.state === "running") setTimeout(wait, 1000);
      };
      wait();
    } catch (e) { said.textContent = e.message; }
  });
}

document.addEventListener("DOMContentLoaded", () => { watchRuns(); watchRun(); predictForm(); watchReview(); runActions(); });
