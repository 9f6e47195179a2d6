// The playground: streams completions and chat over the server's own OpenAI-compatible API (fetch + SSE parsing,
// since EventSource cannot POST), and colours tokens by the memory's surprise ("return_surprise", docs/serving.md).
// No build step and no dependencies: this file is served as is.
"use strict";

const $ = (id) => document.getElementById(id);
const METRICS_POLL_MS = 1000;

let apiKey = "";          // from the API key box; lives in this page's memory only
let modelName = null;     // the served model, from /v1/models
let chatHistory = [];     // chat mode: the finished turns, resent with each request
let run = null;           // the generation on screen (see newRun)
let redrawPending = false;

function headers() {
  const h = {"Content-Type": "application/json"};
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

// ---- server view: slots in use and state size from /metrics (Prometheus text) ----

function metricValue(text, name) {
  const match = text.match(new RegExp(`^miras:${name}(?:\\{[^}]*\\})? (\\S+)$`, "m"));
  return match ? Number(match[1]) : null;
}

function formatBytes(n) {
  if (n === null) return "?";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function pollServer() {
  try {
    if (modelName === null) {
      const models = await fetch("v1/models", {headers: headers()});
      if (models.ok) modelName = (await models.json()).data[0].id;
      $("model-name").textContent = modelName ?? (models.status === 401 ? "(API key needed)" : "?");
    }
    const response = await fetch("metrics", {headers: headers()});
    if (!response.ok) return;
    const text = await response.text();
    const show = (id, value) => { $(id).textContent = value === null ? "?" : String(value); };
    show("slots-used", metricValue(text, "state_slots_used"));
    show("slots-total", metricValue(text, "state_slots_capacity"));
    show("requests-waiting", metricValue(text, "num_requests_waiting"));
    $("state-size").textContent = formatBytes(metricValue(text, "state_bytes_per_sequence"));
  } catch (err) {
    // the server is restarting or gone: the next poll tries again
  } finally {
    setTimeout(pollServer, METRICS_POLL_MS);
  }
}

// ---- SSE ----

async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;  // comment lines (": ping") carry no data
    }
  }
}

// ---- surprise: spans of tokens, their values, and the heat map ----

function newRun(withSurprise) {
  $("output").replaceChildren();
  const promptBox = document.createElement("span");
  promptBox.className = "prompt-tokens";
  const replyBox = document.createElement("span");
  replyBox.className = "reply";
  $("output").append(promptBox, replyBox);
  return {
    withSurprise, promptBox, replyBox, spans: [], promptSpans: [], generated: 0, layers: [],
    promptSurprise: [], completionSurprise: [], started: performance.now(), firstToken: null, reply: "",
    controller: new AbortController(),
  };
}

function addTokens(target, spans, text, tokens, start, kind) {
  // one span per token when the token strings spell the text, else one span for the whole piece
  const pieces = tokens.length > 1 && tokens.join("") === text ? tokens : [text];
  const count = pieces.length === 1 ? Math.max(tokens.length, 1) : 1;
  let index = start;
  for (const piece of pieces) {
    const el = document.createElement("span");
    el.className = "tok";
    el.textContent = piece;
    el.dataset.kind = kind;
    target.append(el);
    spans.push({el, start: index, count});
    index += count;
  }
  return index - start;
}

function addSurprise(surprise) {
  if (surprise.layers && run.layers.length === 0) {
    run.layers = surprise.layers;
    const select = $("surprise-layer");
    for (const layer of surprise.layers) {
      const known = [...select.options].some((o) => o.value === String(layer));
      if (!known) select.add(new Option(`layer ${layer}`, String(layer)));
    }
  }
  if (surprise.prompt) run.promptSurprise.push(...surprise.prompt);
  if (surprise.completion) run.completionSurprise.push(...surprise.completion);
  scheduleRedraw();
}

function layerValue(row) {
  if (!row) return null;
  const layer = $("surprise-layer").value;
  if (layer === "mean") return row.reduce((a, b) => a + b, 0) / row.length;
  const i = run.layers.indexOf(Number(layer));
  return i < 0 ? null : row[i];
}

function spanValue(span, values) {
  const known = [];
  for (let t = span.start; t < span.start + span.count; t++) {
    const v = layerValue(values[t]);
    if (v !== null && Number.isFinite(v)) known.push(v);
  }
  return known.length ? known.reduce((a, b) => a + b, 0) / known.length : null;
}

function heat(t) {  // t in [0, 1]: pale yellow to red
  return `hsl(${55 - 55 * t} ${95 - 10 * t}% ${88 - 33 * t}%)`;
}

function scheduleRedraw() {
  if (!redrawPending) { redrawPending = true; requestAnimationFrame(redraw); }
}

function redraw() {
  redrawPending = false;
  if (!run) return;
  const on = $("surprise").checked;
  const pairs = [...run.promptSpans.map((s) => [s, spanValue(s, run.promptSurprise)]),
                 ...run.spans.map((s) => [s, spanValue(s, run.completionSurprise)])];
  const logs = pairs.filter(([, v]) => v !== null).map(([, v]) => Math.log(Math.max(v, 1e-12)));
  const lo = Math.min(...logs), hi = Math.max(...logs);
  for (const [span, v] of pairs) {
    span.el.classList.toggle("heat", on && v !== null);
    span.el.classList.toggle("unknown", on && v === null);
    span.el.style.background = on && v !== null ? heat(hi > lo ? (Math.log(Math.max(v, 1e-12)) - lo) / (hi - lo) : 0.5) : "";
    span.el.title = v === null ? "" : `surprise ${v.toPrecision(4)}`;
  }
  $("legend").hidden = !on || logs.length === 0;
  if (logs.length) {
    $("legend-lo").textContent = Math.exp(lo).toPrecision(3);
    $("legend-hi").textContent = Math.exp(hi).toPrecision(3);
  }
}

async function showPromptTokens(body) {
  // the prompt's tokens as the server splits them, to colour them by their surprise
  const mine = run;  // a newer run may have replaced it by the time the answer comes
  const request = {return_token_strs: true};
  if (body.messages) request.messages = body.messages; else request.prompt = body.prompt;
  const response = await fetch("tokenize", {method: "POST", headers: headers(), body: JSON.stringify(request)});
  if (!response.ok) return;
  const strs = (await response.json()).token_strs;
  if (mine.promptBox.isConnected) {
    mine.promptBox.replaceChildren();
    strs.forEach((s, i) => addTokens(mine.promptBox, mine.promptSpans, s, [s], i, "prompt"));
    scheduleRedraw();
  }
}

// ---- generation ----

function requestBody(prompt, withSurprise) {
  const body = {
    max_tokens: numberField("max-tokens"), temperature: numberField("temperature"), top_p: numberField("top-p"),
    top_k: numberField("top-k"), seed: numberField("seed"), ignore_eos: $("ignore-eos").checked,
    stream: true, stream_options: {include_usage: true},
  };
  if (modelName) body.model = modelName;
  if (mode() === "chat") {
    body.messages = [...chatHistory, {role: "user", content: prompt}];
  } else {
    body.prompt = prompt;
  }
  if (withSurprise) {
    body.return_surprise = true;
    body.logprobs = mode() === "chat" ? true : 0;  // token strings split the streamed text per token
  }
  return body;
}

function showStats(usage) {
  const tokens = usage ? usage.completion_tokens : run.generated;
  $("ntokens").textContent = String(tokens);
  if (run.firstToken !== null) {
    $("ttft").textContent = `${Math.round(run.firstToken - run.started)} ms`;
    const seconds = (performance.now() - run.firstToken) / 1000;
    if (tokens > 1 && seconds > 0) $("tps").textContent = ((tokens - 1) / seconds).toFixed(1);
  }
}

function onChoice(choice) {
  const chat = mode() === "chat";
  const text = (chat ? choice.delta && choice.delta.content : choice.text) || "";
  const tokens = choice.logprobs ? (chat ? (choice.logprobs.content || []).map((e) => e.token)
                                         : choice.logprobs.tokens || []) : [];
  if (choice.surprise) addSurprise(choice.surprise);
  if (text || tokens.length) {
    if (run.firstToken === null) run.firstToken = performance.now();
    const output = $("output");
    const following = output.scrollHeight - output.scrollTop - output.clientHeight < 40;
    run.generated += addTokens(run.replyBox, run.spans, text, tokens, run.generated, "completion");
    if (following) output.scrollTop = output.scrollHeight;  // keep the newest text in view unless scrolled up
    run.reply += text;
    scheduleRedraw();
  }
  return choice.finish_reason;
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch (err) {
    return `HTTP ${response.status}`;
  }
}

function setBusy(busy, status) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = status;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function archiveChatTurn(prompt, reply) {
  chatHistory.push({role: "user", content: prompt}, {role: "assistant", content: reply});
  for (const [role, content] of [["user", prompt], ["assistant", reply]]) {
    const msg = document.createElement("div");
    msg.className = "msg";
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role;
    msg.append(label, document.createTextNode(content));
    $("transcript").append(msg);
  }
}

async function send() {
  const prompt = $("prompt").value;
  const withSurprise = $("surprise").checked;
  showError("");
  run = newRun(withSurprise);
  const body = requestBody(prompt, withSurprise);
  if (withSurprise) {
    showPromptTokens(body);
  } else if (mode() === "completion") {
    run.promptBox.textContent = prompt;
  }
  setBusy(true, "generating…");
  $("ttft").textContent = "–"; $("tps").textContent = "–"; $("ntokens").textContent = "0";
  const path = mode() === "chat" ? "v1/chat/completions" : "v1/completions";
  let finish = null;
  let usage = null;
  const mine = run;
  try {
    const response = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body),
                                        signal: mine.controller.signal});
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) finish = onChoice(choice) || finish;
      showStats(usage);
    }
    setBusy(false, `finished: ${finish || "?"}`);
    if (mode() === "chat") {
      archiveChatTurn(prompt, mine.reply);
      $("prompt").value = "";
    }
  } catch (err) {
    if (err.name === "AbortError") {
      setBusy(false, "stopped");
    } else {
      setBusy(false, "failed");
      showError(err.message);
    }
  }
}

function stop() {
  if (run) run.controller.abort();  // the server sees the disconnect and frees the slot
}

function clearAll() {
  stop();
  chatHistory = [];
  run = null;
  $("transcript").replaceChildren();
  $("output").replaceChildren();
  $("status").textContent = "";
  showError("");
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", stop);
$("clear").addEventListener("click", clearAll);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("send").disabled) send();
});
$("surprise").addEventListener("change", scheduleRedraw);
$("surprise-layer").addEventListener("change", scheduleRedraw);
$("api-key").addEventListener("input", () => {
  apiKey = $("api-key").value.trim();
  modelName = null;  // retry /v1/models with the key
});
for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", clearAll);
pollServer();
