// lungdet serve's page: a view of the JSON API. Every number shown comes from POST /api/v1/detect;
// the page only draws it and hides boxes below the slider. No external scripts, no storage beyond this tab.
"use strict";

const API = "/api/v1";
const SVG_NS = "http://www.w3.org/2000/svg";
const TOKEN_KEY = "lungdet-api-token";

let token = sessionStorage.getItem(TOKEN_KEY) || "";
const waitingForToken = [];

function authHeaders() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function el(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function svg(tag, attributes = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function setStatus(text) {
  document.getElementById("status").textContent = text;
}

function showTokenPanel(message) {
  const panel = document.getElementById("token-panel");
  panel.hidden = false;
  if (message) setStatus(message);
  document.getElementById("token").focus();
}

async function loadModelInfo() {
  const response = await fetch(`${API}/health`, { headers: authHeaders() });
  if (response.status === 401) {
    showTokenPanel("This server needs its API token before it can analyse anything.");
    document.getElementById("model-info").textContent = "Model details appear once the token is accepted.";
    return;
  }
  if (!response.ok) {
    document.getElementById("model-info").textContent = `The server's health check failed (HTTP ${response.status}).`;
    return;
  }
  const health = await response.json();
  document.getElementById("token-panel").hidden = true;
  const model = health.model;
  document.getElementById("model-info").textContent =
    `Model ${model.architecture} at ${model.image_size} px on ${health.device} (${health.precision}), ` +
    `checkpoint ${model.checkpoint_sha256.slice(0, 12)}…, tuned cut-off ${Math.round(model.score_threshold * 100)}%. ` +
    `lungdet ${health.version}.`;
}

function formatNumber(value, digits) {
  return Number(value).toFixed(digits);
}

function drawBoxes(overlay, reply) {
  const { width, height } = reply.image;
  overlay.setAttribute("viewBox", `0 0 ${width} ${height}`);
  overlay.querySelector("title").textContent = `X-ray, ${width} x ${height} pixels, with ${reply.boxes.length} predicted boxes`;
  const picture = svg("image", { x: 0, y: 0, width, height, preserveAspectRatio: "none" });
  picture.setAttribute("href", `data:${reply.preview.media_type};base64,${reply.preview.data}`);
  overlay.appendChild(picture);
  const fontSize = Math.max(12, Math.round(Math.max(width, height) / 40));
  // Least confident first, so the most confident box and its label are drawn on top.
  const order = reply.boxes.map((_, index) => index).reverse();
  for (const index of order) {
    const box = reply.boxes[index];
    const group = svg("g", { class: "box", "data-confidence": box.confidence, "data-index": index });
    group.appendChild(svg("rect", { x: box.x, y: box.y, width: box.width, height: box.height, "vector-effect": "non-scaling-stroke" }));
    const label = `${Math.round(box.confidence * 100)}%`;
    const tagHeight = fontSize * 1.3;
    const tagTop = box.y - tagHeight >= 0 ? box.y - tagHeight : box.y;
    group.appendChild(svg("rect", { class: "tag", x: box.x, y: tagTop, width: fontSize * (0.65 * label.length + 0.6), height: tagHeight }));
    const text = svg("text", { x: box.x + fontSize * 0.3, y: tagTop + fontSize * 1.02, "font-size": fontSize });
    text.textContent = label;
    group.appendChild(text);
    overlay.appendChild(group);
  }
}

function fillTable(tbody, boxes) {
  boxes.forEach((box, index) => {
    const row = el("tr", { "data-index": index });
    const pixels = [box.x, box.y, box.width, box.height].map((value) => formatNumber(value, 1));
    for (const value of [index + 1, `${formatNumber(box.confidence * 100, 2)}%`, ...pixels]) {
      row.appendChild(el("td", {}, String(value)));
    }
    tbody.appendChild(row);
  });
}

function fillMeta(list, image) {
  const rows = [
    ["Format", image.format.toUpperCase()],
    ["Size", `${image.width} × ${image.height} px`],
  ];
  if (image.format === "dicom") {
    rows.push(["View position", image.view_position || "not given"]);
    rows.push(["Sex", image.sex || "not given"]);
    rows.push(["Age", image.age === null ? "not given" : `${image.age} years`]);
  } else {
    rows.push(["Patient tags", "none in a PNG or JPEG"]);
  }
  for (const [term, value] of rows) {
    list.appendChild(el("dt", {}, term));
    list.appendChild(el("dd", {}, value));
  }
}

// The server's PredictionString, keeping the groups whose boxes are shown: groups and boxes share one order.
function visiblePredictionString(reply, shown) {
  const tokens = reply.prediction_string.split(/\s+/).filter(Boolean);
  const groups = [];
  for (let index = 0; index < reply.boxes.length; index += 1) {
    if (shown[index]) groups.push(tokens.slice(index * 5, index * 5 + 5).join(" "));
  }
  return groups.join(" ");
}

function applySlider(card, reply) {
  const slider = card.querySelector(".min-confidence");
  const percent = Number(slider.value);
  card.querySelector(".min-confidence-value").textContent = `${percent}%`;
  slider.setAttribute("aria-valuetext", `${percent} percent`);
  // Compared in percent with the 4-decimal confidence, so 0.29 is shown at 29% (0.29 * 100 is 28.999… in floating point).
  const shown = reply.boxes.map((box) => Math.round(box.confidence * 10000) >= percent * 100);
  card.querySelectorAll(".overlay .box").forEach((group) => group.classList.toggle("is-hidden", !shown[Number(group.dataset.index)]));
  card.querySelectorAll(".box-table tbody tr").forEach((row) => row.classList.toggle("is-hidden", !shown[Number(row.dataset.index)]));
  const count = shown.filter(Boolean).length;
  card.querySelector(".box-count").textContent =
    `${count} of ${reply.boxes.length} boxes at or above ${percent}% (the model's tuned cut-off is ${Math.round(reply.model.score_threshold * 100)}%)`;
  card.querySelector(".prediction-string-text").value = visiblePredictionString(reply, shown);
}

async function copyText(textarea, button) {
  try {
    if (!navigator.clipboard || !window.isSecureContext) throw new Error("no clipboard API");
    await navigator.clipboard.writeText(textarea.value);
  } catch {
    // Served over plain HTTP to another machine, the clipboard API is off; selecting and copying still works.
    textarea.select();
    document.execCommand("copy");
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

async function downloadAnnotated(file, card, reply, button) {
  const form = new FormData();
  // A neutral name: the server needs the content only, and a file's name may identify its patient.
  form.append("file", file, "xray");
  form.append("min_confidence", card.querySelector(".min-confidence").value);
  button.disabled = true;
  try {
    const response = await fetch(`${API}/annotate`, { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: `lungdet-${reply.id}.png` });
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    setStatus(`Download failed: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function showReply(card, file, reply) {
  const verdict = card.querySelector(".verdict");
  const positive = reply.label.name === "Lung Opacity";
  verdict.textContent = reply.label.name;
  verdict.classList.add(positive ? "positive" : "negative");
  // A percentage only where the model has an image-level probability: a box's confidence is not the
  // chance that the image has an opacity, and an image without boxes is not certainly clear.
  const detail = reply.label.probability === null
    ? `${positive ? "a box reached" : "no box reached"} the cut-off; this model gives no image-level probability`
    : `probability of an opacity ${formatNumber(reply.label.probability, 1)}%` +
      (reply.label.calibrated ? ", calibrated on validation images" : ", not calibrated");
  verdict.appendChild(el("small", {}, ` (${detail})`));
  verdict.hidden = false;
  card.querySelector(".card-title").appendChild(el("small", {}, ` · ${reply.id} · ${reply.elapsed_ms} ms`));

  drawBoxes(card.querySelector(".overlay"), reply);
  fillTable(card.querySelector(".box-table tbody"), reply.boxes);
  fillMeta(card.querySelector(".meta"), reply.image);
  const notes = card.querySelector(".notes");
  for (const note of reply.image.notes) notes.appendChild(el("li", {}, note.reason));

  const slider = card.querySelector(".min-confidence");
  slider.value = String(Math.round(reply.model.score_threshold * 100));
  slider.addEventListener("input", () => applySlider(card, reply));
  applySlider(card, reply);

  const copy = card.querySelector(".copy");
  copy.addEventListener("click", () => copyText(card.querySelector(".prediction-string-text"), copy));
  const download = card.querySelector(".download");
  download.addEventListener("click", () => downloadAnnotated(file, card, reply, download));

  card.querySelector(".card-state").hidden = true;
  card.querySelector(".card-body").hidden = false;
  card.setAttribute("aria-busy", "false");
}

function showFailure(card, message) {
  card.classList.add("failed");
  card.querySelector(".card-state").textContent = message;
  card.setAttribute("aria-busy", "false");
}

// Titled by position and, once answered, by the upload's hash, never by the file's name: exports are
// often named after the patient (RSNA's after the PatientID), and the page must not show identifiers.
function newCard(position, count, group) {
  const card = document.getElementById("card-template").content.firstElementChild.cloneNode(true);
  card.querySelector(".card-title").textContent = `File ${position} of ${count}`;
  group.appendChild(card);
  return card;
}

async function analyse(file, card) {
  const form = new FormData();
  // A neutral name: the server needs the content only, and a file's name may identify its patient.
  form.append("file", file, "xray");
  // Every box the model gives, so the slider can show those below the tuned cut-off too.
  form.append("min_confidence", "0");
  form.append("include_preview", "true");
  let response;
  try {
    response = await fetch(`${API}/detect`, { method: "POST", body: form, headers: authHeaders() });
  } catch (error) {
    showFailure(card, `The server could not be reached (${error.message}).`);
    return;
  }
  if (response.status === 401) {
    waitingForToken.push([file, card]);
    card.querySelector(".card-state").textContent = "Waiting for the API token…";
    showTokenPanel("This server needs its API token.");
    return;
  }
  if (!response.ok) {
    showFailure(card, await errorMessage(response));
    return;
  }
  showReply(card, file, await response.json());
}

async function analyseAll(files) {
  // The newest choice on top, its files in the order they were chosen.
  const group = el("div", { class: "result-group" });
  document.getElementById("results").prepend(group);
  const queue = Array.from(files).map((file, index, all) => [file, newCard(index + 1, all.length, group)]);
  for (let index = 0; index < queue.length; index += 1) {
    setStatus(`Analysing ${index + 1} of ${queue.length}…`);
    await analyse(...queue[index]);
  }
  setStatus(queue.length ? `Done: ${queue.length} file${queue.length > 1 ? "s" : ""}.` : "");
}

function setUp() {
  const input = document.getElementById("upload");
  input.addEventListener("change", () => {
    analyseAll(input.files).finally(() => { input.value = ""; });
  });
  const zone = document.getElementById("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    analyseAll(event.dataTransfer.files);
  });
  document.getElementById("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    token = document.getElementById("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    await loadModelInfo();
    if (!document.getElementById("token-panel").hidden) return;
    const waiting = waitingForToken.splice(0);
    for (const [file, card] of waiting) {
      card.querySelector(".card-state").textContent = "Analysing…";
      await analyse(file, card);
    }
  });
  loadModelInfo().catch((error) => setStatus(`The server could not be reached (${error.message}).`));
}

setUp();
