// The chat page's behaviour. It is an ordinary OpenAI API client of the server that
// serves it: the model name from GET v1/models, each turn a POST v1/chat/completions
// with stream: true and the whole conversation as `messages`, the answer read from
// the server-sent events (`data: {chunk}` blocks, `data: [DONE]` last) as they arrive
// and appended to the page. Stop aborts the request; the server sees the connection
// close and frees the sequence's slot. The conversation is kept only here, in
// `state.messages`; nothing is stored on the server.
//
// The answer's element carries data-state: "streaming", then "done", "stopped" or
// "error" (the tests wait on it). Text goes into the page as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), log: $("log"), error: $("error"), form: $("composer"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), clear: $("clear"),
  key: $("api-key"), system: $("system"), temperature: $("temperature"),
  maxTokens: $("max-tokens"),
};
const state = { model: null, messages: [], controller: null };

class ServerError extends Error {}

// ------------------------------------------------------------------ talking to the API

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = ui.key.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// One line for a failed response: its status and the server's error.message.
async function errorText(response) {
  let message = "";
  try {
    const body = await response.json();
    message = (body && body.error && body.error.message) || "";
  } catch (_) { /* not JSON: the status says enough */ }
  const head = `The server answered ${response.status}` +
    (response.statusText ? ` ${response.statusText}` : "");
  const hint = response.status === 401 ? " Enter the server's API key under Settings." : "";
  const said = message ? `: ${message}${/[.!?]$/.test(message) ? "" : "."}` : ".";
  return head + said + hint;
}

function networkText(error) {
  return `Cannot reach the server (${error.message}). Is tinylm serve still running?`;
}

// The chunks of an SSE body, parsed: an async generator that ends at `data: [DONE]`.
// Events are separated by a blank line; an event's data is its `data:` lines joined.
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const separator = /\r\n\r\n|\n\n|\r\r/;
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new ServerError("The server closed the stream before the answer ended.");
      buffer += value;
      let cut;
      while ((cut = separator.exec(buffer))) {
        const block = buffer.slice(0, cut.index);
        buffer = buffer.slice(cut.index + cut[0].length);
        const data = block.split(/\r\n|\n|\r/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;  // a comment or keep-alive
        if (data === "[DONE]") return;
        try {
          yield JSON.parse(data);
        } catch (e) {
          if (e instanceof SyntaxError) throw new ServerError("The server sent an event that is not JSON.");
          throw e;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function chatRequest(messages) {
  const body = { messages, stream: true };
  if (state.model) body.model = state.model;
  const temperature = parseFloat(ui.temperature.value);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: headers(false) });
    if (!response.ok) {
      state.model = null;
      ui.model.textContent = "no model";
      showError(await errorText(response));
      return;
    }
    const list = await response.json();
    state.model = (list.data && list.data[0] && list.data[0].id) || null;
    ui.model.textContent = state.model || "no model";
    showError("");
  } catch (error) {
    state.model = null;
    ui.model.textContent = "offline";
    showError(networkText(error));
  }
}

// ------------------------------------------------------------------ the page

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = !text;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  li.dataset.role = role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("p");
  content.className = "content";
  content.textContent = text;
  li.append(label, content);
  ui.log.append(li);
  scrollDown(true);
  return li;
}

// Follow the answer as it grows, unless the reader has scrolled up to read.
function scrollDown(force) {
  const box = ui.log.parentElement;
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) {
    box.scrollTop = box.scrollHeight;
  }
}

function finish(li, how, note) {
  li.dataset.state = how;
  li.removeAttribute("aria-busy");
  if (note) {
    const small = document.createElement("span");
    small.className = "note";
    small.textContent = note;
    li.append(small);
  }
}

// Stream one answer into `content`; returns [text, finish_reason].
async function streamAnswer(messages, content, signal) {
  let response;
  try {
    response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(true), signal, body: JSON.stringify(chatRequest(messages)),
    });
  } catch (error) {
    if (signal.aborted) throw error;
    throw new ServerError(networkText(error));
  }
  if (!response.ok) throw new ServerError(await errorText(response));
  let text = "";
  let reason = null;
  for await (const chunk of events(response.body)) {
    if (chunk.error) throw new ServerError(`The server stopped the answer: ${chunk.error.message}`);
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) continue;  // the usage chunk
    const piece = choice.delta && choice.delta.content;
    if (piece) {
      text += piece;
      content.append(piece);
      scrollDown(false);
    }
    if (choice.finish_reason) reason = choice.finish_reason;
  }
  return [text, reason];
}

// One turn: show the message, stream the answer, keep both in the conversation. A turn
// that produced no text at all (an error, or Stop before the first token) is taken
// back: the message returns to the box for another try.
async function send(text) {
  const system = ui.system.value.trim();
  const turn = { role: "user", content: text };
  const messages = [...(system ? [{ role: "system", content: system }] : []),
                    ...state.messages, turn];
  const asked = addMessage("user", text);
  const li = addMessage("assistant", "");
  li.dataset.state = "streaming";
  li.setAttribute("aria-busy", "true");
  const content = li.querySelector(".content");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  showError("");
  let reply = "";
  try {
    if (!state.model) await loadModel();  // e.g. the API key was entered since
    if (!state.model) throw new ServerError(ui.error.textContent || "The server serves no model.");
    const [answer, reason] = await streamAnswer(messages, content, controller.signal);
    reply = answer;
    finish(li, "done", reason === "length" ? "(cut at the max tokens limit)" : "");
  } catch (error) {
    reply = content.textContent;
    const stopped = controller.signal.aborted;
    if (!stopped) showError(error instanceof ServerError ? error.message : String(error));
    if (!reply) {
      asked.remove();
      li.remove();
      if (!ui.prompt.value) ui.prompt.value = text;
    } else {
      finish(li, stopped ? "stopped" : "error", stopped ? "(stopped)" : "(interrupted)");
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  // (New chat during the answer has removed it: that conversation is gone.)
  if (reply && li.isConnected) state.messages.push(turn, { role: "assistant", content: reply });
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value;
  if (!text.trim() || state.controller) return;
  ui.prompt.value = "";
  send(text);
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  ui.prompt.focus();
});

ui.clear.addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  ui.log.replaceChildren();
  showError("");
  ui.prompt.focus();
});

ui.key.addEventListener("change", loadModel);
$("settings-form").addEventListener("submit", (event) => {  // Enter in a settings field
  event.preventDefault();
  loadModel();
});

loadModel();
ui.prompt.focus();
