// comfyui-zimage: a "Z-Image" menu that opens the bundled workflows. The same files appear in ComfyUI's
// template browser under this package, served by ComfyUI from workflows/ (/api/workflow_templates/...), in the
// menu's order.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// The folder ComfyUI loaded this package from (users may clone it under another name).
const PACKAGE = decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2));

// Every workflows/*.json, in menu order (tests/unit/test_workflows.py checks this list against the folder, and the
// steps and cfg a label quotes against the loader's recommended settings for the workflow's model).
export const WORKFLOWS = [
  ["zimage-turbo", "Turbo: text to image (9 steps, cfg 1)"],
  ["zimage-base", "Base: text to image with a negative prompt (30 steps, cfg 4)"],
  ["zimage-edit", "Edit: instruction editing and masked inpainting"],
  ["zimage-turbo-speed-test", "Turbo speed test (k_gen)"],
  ["zimage-base-quality-benchmark", "Base quality benchmark (k_gen, I(t))"],
];

// The template browser (frontends 1.32 and 1.49 alike) shows a custom node's workflows in the order the server's
// /workflow_templates lists them, which is the order of the files on disk; the frontend reads that list through
// api.getWorkflowTemplates, so this package's entries are put in menu order (turbo first) there. Those frontends
// take a custom node template's title and description from its file name alone, so nothing else can be given.
const ORDER = new Map(WORKFLOWS.map(([name], i) => [name, i]));
const listTemplates = api.getWorkflowTemplates?.bind(api);
if (listTemplates) {
  api.getWorkflowTemplates = async () => {
    const templates = await listTemplates();
    const own = templates?.[PACKAGE];
    if (Array.isArray(own)) {
      const rank = (name) => ORDER.get(name) ?? ORDER.size;
      templates[PACKAGE] = [...own].sort((a, b) => rank(a) - rank(b) || String(a).localeCompare(String(b)));
    }
    return templates;
  };
}

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
