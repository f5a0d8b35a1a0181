// comfyui-zimage canvas extension: gives this package's nodes one recognisable colour, and only this package's:
// core ComfyUI has its own "ZImage..." nodes (ZImageFunControlnet), so a name prefix is not enough.
import { app } from "../../scripts/app.js";

const ZIMAGE_COLOR = "#1f3a4d";
const ZIMAGE_BGCOLOR = "#29506a";

// This package's node ids: used only where the server gives no python_module for a node definition.
const OWN_NODES = new Set([
  "ZImageCheckpointLoader", "ZImageTiledVAEDecode", "ZImageTiledVAEEncode", "ZImageEntropyPrunedAttention",
  "ZImagePruningReport", "ZImageKGenProbe", "ZImageKGenReport", "ZImageChineseTextEncode", "ZImageExampleImage",
]);

// ComfyUI serves this package's web folder at /extensions/<folder>/ and gives its nodes the python_module
// custom_nodes.<folder>, whatever the folder is called on this machine.
const OWN_MODULE = (() => {
  const match = new URL(import.meta.url).pathname.match(/\/extensions\/([^/]+)\//);
  return match ? `custom_nodes.${decodeURIComponent(match[1])}` : null;
})();

function isOwn(nodeData) {
  const module = nodeData?.python_module;
  if (OWN_MODULE && typeof module === "string" && module) return module === OWN_MODULE;
  return OWN_NODES.has(nodeData?.name);
}

const ownTypes = new Set();

app.registerExtension({
  name: "comfyui-zimage.appearance",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (isOwn(nodeData)) ownTypes.add(nodeData.name);
  },
  nodeCreated(node) {
    if (ownTypes.has(node.comfyClass) || isOwn(node.constructor?.nodeData)) {
      node.color = node.color ?? ZIMAGE_COLOR;
      node.bgcolor = node.bgcolor ?? ZIMAGE_BGCOLOR;
    }
  },
});
