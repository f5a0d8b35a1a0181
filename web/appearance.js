// comfyui-zimage canvas extension: gives this package's nodes one recognisable colour.
import { app } from "../../scripts/app.js";

const ZIMAGE_COLOR = "#1f3a4d";
const ZIMAGE_BGCOLOR = "#29506a";

app.registerExtension({
  name: "comfyui-zimage.appearance",
  nodeCreated(node) {
    if (typeof node.comfyClass === "string" && node.comfyClass.startsWith("ZImage")) {
      node.color = node.color ?? ZIMAGE_COLOR;
      node.bgcolor = node.bgcolor ?? ZIMAGE_BGCOLOR;
    }
  },
});
