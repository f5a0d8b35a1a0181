// comfyui-zimage: a "Z-Image" menu that opens the bundled workflows. The same files appear in ComfyUI's
// template browser under this package, served by ComfyUI from workflows/ (/api/workflow_templates/...).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// The folder ComfyUI loaded this package from (users may clone it under another name).
const PACKAGE = decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2));

// Every workflows/*.json, in menu order (tests/test_workflows.py checks this list against the folder).
export const WORKFLOWS = [
  ["zimage-turbo", "Turbo: text to image (8 steps, cfg 1)"],
  ["zimage-base", "Base: text to image with a negative prompt (30 steps, cfg 4)"],
  ["zimage-edit", "Edit: instruction editing and masked inpainting"],
  ["zimage-turbo-speed-test", "Turbo speed test (k_gen)"],
  ["zimage-base-quality-benchmark", "Base quality benchmark (k_gen, I(t))"],
];

async function openWorkflow(name) {
  const response = await api.fetchApi(`/workflow_templates/${encodeURIComponent(PACKAGE)}/${name}.json`);
  if (!response.ok) throw new Error(`comfyui-zimage: cannot load workflow ${name} (HTTP ${response.status})`);
  await app.loadGraphData(await response.json(), true, true, name);
}

app.registerExtension({
  name: "comfyui-zimage.workflows",
  commands: WORKFLOWS.map(([name, label]) => ({
    id: `ZImage.OpenWorkflow.${name}`,
    label,
    icon: "pi pi-images",
    function: () => openWorkflow(name),
  })),
  menuCommands: [{ path: ["Z-Image"], commands: WORKFLOWS.map(([name]) => `ZImage.OpenWorkflow.${name}`) }],
});
