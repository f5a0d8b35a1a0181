// comfyui-zimage canvas extension: the server's warnings about a run (a cfg above 1 on Turbo, say) as a toast,
// where the user looks, instead of only in the server's log.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
  name: "comfyui-zimage.warnings",
  setup() {
    api.addEventListener("zimage.warning", ({ detail }) => {
      const toast = app.extensionManager?.toast;
      if (toast) toast.add({ severity: "warn", summary: "Z-Image", detail: detail.message, life: 12000 });
      else console.warn(`Z-Image: ${detail.message}`);
    });
  },
});
