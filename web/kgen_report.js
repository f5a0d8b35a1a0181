// comfyui-zimage: the k_gen report's figures, shown in the node after it runs. The plot is the node's own
// preview image (ComfyUI draws it below the widgets); the figures are the report's summary lines.
import { app } from "../../scripts/app.js";

const NODE = "ZImageKGenReport";

app.registerExtension({
  name: "comfyui-zimage.kgen-report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const r = onNodeCreated?.apply(this, args);
      const node = this;
      const el = document.createElement("div");
      el.className = "zimage-kgen-figures";
      el.style.cssText = "font: 12px/1.35 monospace; padding: 4px 6px; white-space: pre-wrap; overflow: auto; color: var(--input-text, #ddd);";
      el.textContent = "k_gen: run the workflow to measure.";
      const w = this.addDOMWidget("figures", "zimage_kgen_figures", el, {
        serialize: false,
        hideOnZoom: false, // a few lines of text: readable whenever the node is
        margin: 6,
        getMinHeight: () => {
          // one 20 px row per line as wrapped at the node's width (monospace 12 px: about 7.3 px a character)
          const perRow = Math.max(20, Math.floor(((node.size?.[0] ?? 500) - 24) / 7.3));
          const rows = el.textContent.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / perRow)), 0);
          return 16 + 20 * Math.max(2, rows);
        },
      });
      w.serialize = false;
      this.zimageFigures = el;
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const el = this.zimageFigures;
      if (el && message?.text) {
        el.textContent = message.text.join("\n");
        try {
          const report = JSON.parse(message.json?.[0] ?? "{}");
          if (report.k_gen != null) el.dataset.kGen = String(report.k_gen);
        } catch {
          // the lines alone are still worth showing
        }
        const needed = this.computeSize();
        if (needed[1] > this.size[1]) this.setSize([this.size[0], needed[1]]);
        app.graph.setDirtyCanvas(true, true);
      }
      return r;
    };
  },
});
