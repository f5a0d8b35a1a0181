// comfyui-zimage: a live token count on Z-Image Chinese Text Encode. The count comes from the plugin's
// /zimage/tokens route, which runs the real Qwen tokenizer and the node's own parsing: no tokenizer in JS.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "ZImageChineseTextEncode";
const DEBOUNCE_MS = 250;

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function say(el, message) {
  el.classList.remove("zimage-over-limit");
  el.style.color = "";
  delete el.dataset.tokens;
  el.textContent = message;
  el.title = "";
}

function show(el, stats) {
  el.classList.toggle("zimage-over-limit", Boolean(stats.truncated));
  el.style.color = stats.truncated ? "#ff7b72" : "";
  el.dataset.tokens = String(stats.prompt_tokens);
  let text = `${stats.capped ? "≥ " : ""}${stats.prompt_tokens} / ${stats.max_tokens} tokens`;
  if (stats.spans?.length) text += ` · ${stats.spans.length} weighted`;
  const cut = stats.cut_text.length > 40 ? `${stats.cut_text.slice(0, 40)}…` : stats.cut_text;
  if (stats.truncated) text = `⚠ ${text}: over the limit, the end is cut: “${cut}”`;
  else if (stats.warning) text += ` · ${stats.warning}`;
  el.textContent = text;
  el.title = stats.truncated ? `Cut text: ${stats.cut_text}` : "Counted by the real Qwen tokenizer on the server.";
}

function attachCounter(node) {
  const el = document.createElement("div");
  el.className = "zimage-token-count";
  el.style.cssText = "font: 12px/22px sans-serif; padding: 0 6px; color: var(--descrip-text, #aaa); white-space: nowrap; overflow: hidden; text-overflow: ellipsis;";
  const counter = node.addDOMWidget("token_count", "zimage_token_count", el, {
    serialize: false, // neither in the saved workflow nor in the prompt
    hideOnZoom: false,
    margin: 4, // the default 10 px would leave a 22 px line 2 px of room
    getMinHeight: () => 30,
    getMaxHeight: () => 30,
  });
  counter.serialize = false;

  let timer = null;
  let asked = 0;
  const recount = async () => {
    const ticket = ++asked; // any answer still on its way is now stale
    const text = widget(node, "text");
    if (!text || node.inputs?.find((i) => i.name === "text" && i.link != null)) {
      say(el, "text comes from a link: counted when the node runs");
      return;
    }
    let response;
    try {
      response = await api.fetchApi("/zimage/tokens", {
        method: "POST",
        body: JSON.stringify({ text: text.value ?? "", normalise: widget(node, "normalise")?.value ?? true,
          template: widget(node, "template")?.value ?? "z-image chat" }),
      });
    } catch {
      if (ticket === asked) say(el, "token count unavailable: server not reachable");
      return;
    }
    const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (ticket !== asked) return; // a newer keystroke already asked
    if (response.status === 429) return setTimeout(recount, 1000); // the server is counting for others: ask again
    if (response.ok) show(el, answer);
    else say(el, `token count unavailable: ${answer.error ?? response.status}`);
  };
  const soon = () => {
    clearTimeout(timer);
    timer = setTimeout(recount, DEBOUNCE_MS);
  };

  const text = widget(node, "text");
  text?.inputEl?.addEventListener("input", soon);
  for (const name of ["text", "normalise", "template"]) {
    const w = widget(node, name);
    if (!w) continue;
    const original = w.callback;
    w.callback = function (...args) {
      soon();
      return original?.apply(this, args);
    };
  }
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const r = onConfigure?.apply(this, args);
    soon(); // a loaded workflow's text
    return r;
  };
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    const r = onConnectionsChange?.apply(this, args);
    soon();
    return r;
  };
  soon();
}

app.registerExtension({
  name: "comfyui-zimage.token-count",
  nodeCreated(node) {
    if (node.comfyClass === NODE) attachCounter(node);
  },
});
