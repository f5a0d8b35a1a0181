// Builds the bundled workflows with the real ComfyUI frontend, so they are exactly what the canvas saves:
//   node tests/browser/build_workflows.mjs < {"url": "http://127.0.0.1:8188", "out": "workflows"}
// writes workflows/<name>.json (UI format, with Note nodes and groups) and workflows/api/<name>.json (what the
// frontend's own graph-to-prompt exports for it). devtools/build_workflows.py runs it against a fresh server;
// tests/test_browser.py proves the two files still agree.
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { openComfy, readStdinJson } from "./harness.mjs";

const NANO = { text_encoder: "nano_qwen3.safetensors", vae: "nano_ae.safetensors", weight_dtype: "default", compute_dtype: "default" };
const TURBO = "diffusion_models/nano_zimage_turbo.safetensors";
const BASE = "diffusion_models/nano_zimage_base.safetensors";
const EDIT = "diffusion_models/nano_zimage_edit.safetensors";

// A node's title: its role, capitalised, or in the edit workflow its group's prefix ("Edit: ", "Inpaint: ") and the
// role. The notes name nodes by these titles. A title holds ": " only after a group's prefix, since clients read
// the group from what comes before it.
const named = (prefix, role) => (prefix ? `${prefix}${role}` : role[0].toUpperCase() + role.slice(1));
const realFiles = ({ prefix = "", fixedSteps = null } = {}) => `## Switch to the real Z-Image files
This workflow runs on the **nano** models that ship with comfyui-zimage, so it works at once on any machine (tiny, 128 px, simple shapes).

For real pictures put the official files in ComfyUI's model folders:
- \`models/diffusion_models/z_image_turbo_bf16.safetensors\` (Turbo; the base and edit files when released)
- \`models/text_encoders/qwen_3_4b.safetensors\`
- \`models/vae/ae.safetensors\`

\`python3 install.py download\` fetches them (about 20 GB, needs internet). Then choose the model in **${named(prefix, "load model")}** (a Z-Image Checkpoint Loader) and set text_encoder and vae to those files (or \`auto\`). ${fixedSteps === null
    ? "Steps, cfg, shift, sampler and scheduler are wired from the loader, so they follow the model."
    : `Cfg, shift, sampler and scheduler are wired from the loader, so they follow the model; the sampler runs a fixed ${fixedSteps} steps, the number the benchmark measures.`} Set the image size to 1024 × 1024.`;

const pruningNote = (prefix = "") => `## Faster attention (optional)
**${named(prefix, "entropy-pruned attention")}** is bypassed (purple). Select it and press **Ctrl+B** to switch it on: after 2 calibration steps it skips the attention heads with the flattest maps. keep_ratio 0.75 is the safe default; 0.6 is faster (see bench/RESULTS.md).`;

const KGEN = `## k_gen
**Record model calls (k_gen)** records every model call; **k_gen report** shows k_gen = NFE / Δt, the convergence I(t) and its fit after the run, and appends the run to a history in your user folder.`;

const EDIT_NOTE = `## Two ways to edit
**Top: instruction editing** (nano-edit). **Edit: instruction** says what to change in **Edit: picture to edit**: 把红色圆形改成绿色, move the square to the left, 删除三角形. The picture enters the model as reference tokens.

**Bottom: masked inpainting** (nano-turbo). The transparent pixels of **Inpaint: picture with a transparent hole** are repainted with what **Inpaint: what goes in the hole** describes; pixels outside the hole are kept exactly.

## Your own pictures
Both pictures come from **Z-Image Example Image** nodes, which read the examples that ship with this package, so the workflow runs as it opens. For a picture of your own add a **Load Image** node (double-click the canvas, type *Load Image*), upload the picture and connect its outputs where the example node's go.`;

const INPAINT_NOTE = `## Your own picture
Replace **Inpaint: picture with a transparent hole** with a **Load Image** node: its IMAGE goes to *Inpaint: encode the picture* and to the destination of *Inpaint: keep the pixels outside the hole*, its MASK to *Inpaint: mask the latent* and to the mask of *Inpaint: keep the pixels outside the hole*. Upload a picture with a transparent hole, or right-click the node → Open in MaskEditor and paint one.`;

const SPEED_NOTE = `## Turbo speed test
Measures generation kinetics: k_gen = NFE / Δt, Δt from the first model call to the last (loading is not counted), with a batch of 4 at a fixed seed. Run it several times: each run joins the history (label turbo-speed-test) and, once runs at 3 GPU temperatures exist, the report fits Arrhenius (E_a/R). On a GPU the report adds peak memory, temperature, clock and power. Images go to the temp folder only.`;

const QUALITY_NOTE = `## Base quality benchmark
Runs the base model the way quality is judged (30 steps, cfg 4, negative prompt, fixed seed) and reports how the picture converges: I(t) on the latent and on its RGB preview, t₁ (when I reaches 0.95) and the fit 1/(1−I) = k_gen·C_text·t + b, with C_text from the prompt's real token statistics. Compare runs of the same prompt and seed across settings: the history keeps every run.`;

// One spec per workflow, laid out in rows of columns (the builder stacks each column from the nodes' real
// sizes, so nothing overlaps). Node: [id, type, {widgets}, {title, mode, h}]; note: ["note", id, markdown, h, title];
// column: [width, ...items]; row: {title, color, columns}; links: [from id, output name, to id, input name].
// Every node and note has a title of its own, unique in its workflow (tests/test_workflows.py checks it).
const BYPASS = 4; // LiteGraph's mode for a node that passes its input through
const loader = (id, model, prefix = "") => [id, "ZImageCheckpointLoader", { model, ...NANO }, { title: named(prefix, "load model") }];
const pruning = (id, prefix = "") => [id, "ZImageEntropyPrunedAttention", {}, { mode: BYPASS, title: named(prefix, "entropy-pruned attention (off, Ctrl+B)") }];
const sampler = (id, seed, title, widgets = {}) => [id, "KSampler", { seed, control_after_generate: "fixed", denoise: 1.0, ...widgets }, { title }];
const REPORT_W = 560;

function textToImage({ name, model, text, negative, steps = null, batch = 1, label, imageSpace = false, preview = false, prefix, note = null }) {
  const negativeNode = negative === null
    ? [4, "ConditioningZeroOut", {}, { title: "Negative (not used at cfg 1)" }]
    : [4, "ZImageChineseTextEncode", { text: negative }, { title: "Negative prompt", h: 150 }];
  const columns = [
    [360, loader(1, model),
      [3, "ZImageChineseTextEncode", { text }, { title: "Positive prompt", h: 190 }], ...(negative === null ? [] : [negativeNode])],
    [320, [2, "ModelSamplingAuraFlow", {}, { title: "Sampling shift" }], pruning(9),
      [10, "ZImageKGenProbe", { label }, { title: "Record model calls (k_gen)" }], ...(negative === null ? [negativeNode] : [])],
    [300, [5, "EmptySD3LatentImage", { width: 128, height: 128, batch_size: batch }, { title: "Image size" }],
      sampler(6, 42, "Sampler", steps === null ? {} : { steps })],
    [320, [7, "ZImageTiledVAEDecode", {}, { title: "Decode to pixels" }],
      preview ? [8, "PreviewImage", {}, { title: "Preview (temp folder only)", h: 320 }]
        : [8, "SaveImage", { filename_prefix: prefix }, { title: "Save picture", h: 320 }]],
    [REPORT_W, [11, "ZImageKGenReport", { image_space: imageSpace }, { title: "k_gen report", h: 560 }], ["note", 22, KGEN, 110, "About k_gen"]],
    [400, ["note", 20, realFiles({ fixedSteps: steps }), 330, "Switch to the real files"],
      ["note", 21, pruningNote(), 150, "Faster attention"], ...(note ? [["note", 23, note.text, 250, note.title]] : [])],
  ];
  const links = [
    [1, "MODEL", 2, "model"], [1, "shift", 2, "shift"], [2, "MODEL", 9, "model"], [9, "MODEL", 10, "model"],
    [1, "CLIP", 3, "clip"], [10, "MODEL", 6, "model"], [1, "cfg", 6, "cfg"], [1, "sampler", 6, "sampler_name"],
    [1, "scheduler", 6, "scheduler"], [3, "CONDITIONING", 6, "positive"], [5, "LATENT", 6, "latent_image"],
    [6, "LATENT", 7, "samples"], [1, "VAE", 7, "vae"], [7, "IMAGE", 8, "images"],
    [10, "record", 11, "record"], [6, "LATENT", 11, "samples"], [3, "prompt_stats", 11, "prompt_stats"],
    [4, "CONDITIONING", 6, "negative"],
    ...(steps === null ? [[1, "steps", 6, "steps"]] : []),
    ...(negative === null ? [[3, "CONDITIONING", 4, "conditioning"]] : [[1, "CLIP", 4, "clip"]]),
  ];
  return { name, rows: [{ columns }], links };
}

const SPECS = [
  textToImage({ name: "zimage-turbo", model: TURBO, text: "蓝色背景上的红色圆形", negative: null, label: "zimage-turbo", prefix: "zimage-turbo" }),
  textToImage({ name: "zimage-base", model: BASE, text: "白色背景上的三个黄色星形", negative: "模糊，变形", label: "zimage-base", prefix: "zimage-base" }),
  textToImage({ name: "zimage-turbo-speed-test", model: TURBO, text: "灰色背景上的两个绿色正方形", negative: null, batch: 4,
    label: "turbo-speed-test", preview: true, note: { title: "About the speed test", text: SPEED_NOTE } }),
  textToImage({ name: "zimage-base-quality-benchmark", model: BASE, text: "黑色背景上左边的一个紫色三角形", negative: "模糊，变形",
    steps: 30, label: "base-quality-benchmark", imageSpace: true, prefix: "zimage-base-quality",
    note: { title: "About the quality benchmark", text: QUALITY_NOTE } }),
  {
    name: "zimage-edit",
    // Each group's titles start with its prefix, by which a client addresses the group ("Edit: ", "Inpaint: ").
    rows: [
      { // Instruction editing with nano-edit: the picture enters as reference latent tokens.
        title: "Instruction editing (nano-edit)", color: "#3f789e",
        columns: [
          [360, loader(1, EDIT, "Edit: "), [3, "ZImageChineseTextEncode", { text: "把红色圆形改成绿色" }, { title: "Edit: instruction", h: 160 }],
            [4, "ZImageChineseTextEncode", { text: "" }, { title: "Edit: negative prompt", h: 130 }]],
          [320, [2, "ModelSamplingAuraFlow", {}, { title: "Edit: sampling shift" }], pruning(9, "Edit: "),
            [10, "ZImageKGenProbe", { label: "zimage-edit" }, { title: "Edit: record model calls (k_gen)" }]],
          [300, [12, "ZImageExampleImage", { image: "zimage-edit-example.png" }, { title: "Edit: picture to edit", h: 120 }],
            [13, "ZImageTiledVAEEncode", {}, { title: "Edit: encode the picture" }]],
          [300, [14, "ReferenceLatent", {}, { title: "Edit: reference (positive)" }], [15, "ReferenceLatent", {}, { title: "Edit: reference (negative)" }],
            sampler(6, 42, "Edit: sampler")],
          [300, [7, "ZImageTiledVAEDecode", {}, { title: "Edit: decode to pixels" }],
            [8, "SaveImage", { filename_prefix: "zimage-edit" }, { title: "Edit: save", h: 300 }]],
          [REPORT_W, [11, "ZImageKGenReport", {}, { title: "Edit: k_gen report", h: 560 }]],
          [420, ["note", 20, EDIT_NOTE, 330, "Edit: two ways to edit, and your own pictures"],
            ["note", 21, realFiles({ prefix: "Edit: " }), 400, "Edit: switch to the real files"],
            ["note", 22, pruningNote("Edit: "), 170, "Edit: faster attention"]],
        ],
      },
      { // Masked inpainting with nano-turbo: the picture's transparent pixels are repainted, the rest kept.
        title: "Masked inpainting (nano-turbo)", color: "#8a8a3f",
        columns: [
          [360, loader(31, TURBO, "Inpaint: "),
            [33, "ZImageChineseTextEncode", { text: "一个绿色圆形" }, { title: "Inpaint: what goes in the hole", h: 160 }]],
          [320, [32, "ModelSamplingAuraFlow", {}, { title: "Inpaint: sampling shift" }],
            [34, "ConditioningZeroOut", {}, { title: "Inpaint: negative (not used at cfg 1)" }]],
          [300, [35, "ZImageExampleImage", { image: "zimage-inpaint-example.png" }, { title: "Inpaint: picture with a transparent hole", h: 120 }],
            [36, "ZImageTiledVAEEncode", {}, { title: "Inpaint: encode the picture" }]],
          [300, [37, "SetLatentNoiseMask", {}, { title: "Inpaint: mask the latent" }], sampler(38, 3, "Inpaint: sampler")],
          [340, [39, "ZImageTiledVAEDecode", {}, { title: "Inpaint: decode to pixels" }],
            [40, "ImageCompositeMasked", { x: 0, y: 0, resize_source: false }, { title: "Inpaint: keep the pixels outside the hole" }]],
          [320, [41, "SaveImage", { filename_prefix: "zimage-inpaint" }, { title: "Inpaint: save", h: 300 }],
            ["note", 42, INPAINT_NOTE, 200, "Inpaint: your own picture"]],
        ],
      },
    ],
    links: [
      [1, "MODEL", 2, "model"], [1, "shift", 2, "shift"], [2, "MODEL", 9, "model"], [9, "MODEL", 10, "model"],
      [1, "CLIP", 3, "clip"], [1, "CLIP", 4, "clip"], [12, "IMAGE", 13, "pixels"], [1, "VAE", 13, "vae"],
      [3, "CONDITIONING", 14, "conditioning"], [13, "LATENT", 14, "latent"],
      [4, "CONDITIONING", 15, "conditioning"], [13, "LATENT", 15, "latent"],
      [10, "MODEL", 6, "model"], [1, "steps", 6, "steps"], [1, "cfg", 6, "cfg"], [1, "sampler", 6, "sampler_name"],
      [1, "scheduler", 6, "scheduler"], [14, "CONDITIONING", 6, "positive"], [15, "CONDITIONING", 6, "negative"],
      [13, "LATENT", 6, "latent_image"], [6, "LATENT", 7, "samples"], [1, "VAE", 7, "vae"], [7, "IMAGE", 8, "images"],
      [10, "record", 11, "record"], [6, "LATENT", 11, "samples"], [3, "prompt_stats", 11, "prompt_stats"],
      [31, "MODEL", 32, "model"], [31, "shift", 32, "shift"], [31, "CLIP", 33, "clip"], [33, "CONDITIONING", 34, "conditioning"],
      [35, "IMAGE", 36, "pixels"], [31, "VAE", 36, "vae"], [36, "LATENT", 37, "samples"], [35, "MASK", 37, "mask"],
      [32, "MODEL", 38, "model"], [31, "steps", 38, "steps"], [31, "cfg", 38, "cfg"], [31, "sampler", 38, "sampler_name"],
      [31, "scheduler", 38, "scheduler"], [33, "CONDITIONING", 38, "positive"], [34, "CONDITIONING", 38, "negative"],
      [37, "LATENT", 38, "latent_image"], [38, "LATENT", 39, "samples"], [31, "VAE", 39, "vae"],
      [35, "IMAGE", 40, "destination"], [39, "IMAGE", 40, "source"], [35, "MASK", 40, "mask"], [40, "IMAGE", 41, "images"],
    ],
  },
];

function build(spec) {
  const { LiteGraph, app } = window;
  const GAP = 40, TITLE = LiteGraph.NODE_TITLE_HEIGHT ?? 30, GROUP_HEAD = 60;
  app.graph.clear();
  const byId = {};
  const add = (id, type) => {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error(`${spec.name}: node type ${type} is not registered`);
    node.id = id;
    app.graph.add(node);
    byId[id] = node;
    return node;
  };
  let top = 0;
  for (const row of spec.rows) {
    let x = 0, bottom = top;
    const y0 = top + (row.title ? GROUP_HEAD : 0);
    for (const [width, ...items] of row.columns) {
      let y = y0 + TITLE;
      for (const item of items) {
        let node, height;
        if (item[0] === "note") {
          const [, id, text, h, title] = item;
          node = add(id, LiteGraph.registered_node_types.MarkdownNote ? "MarkdownNote" : "Note");
          node.title = title;
          node.widgets[0].value = text;
          height = h;
        } else {
          const [id, type, widgets, options] = item;
          node = add(id, type);
          if (options.title) node.title = options.title;
          if (options.mode !== undefined) node.mode = options.mode;
          for (const [name, value] of Object.entries(widgets)) {
            const widget = node.widgets?.find((w) => w.name === name);
            if (!widget) throw new Error(`${spec.name}: ${type} has no widget ${name}`);
            widget.value = value;
          }
          height = Math.max(options.h ?? 0, node.computeSize()[1]);
        }
        node.pos = [x, y];
        node.size = [Math.max(width, node.computeSize()[0]), height];
        y += height + TITLE + GAP;
      }
      bottom = Math.max(bottom, y);
      x += width + GAP;
    }
    if (row.title) {
      const group = new LiteGraph.LGraphGroup(row.title);
      group.color = row.color;
      group.pos = [-20, top];
      group.size = [x + 20 - GAP + 20, bottom - top];
      app.graph.add(group);
    }
    top = bottom + GAP * 2;
  }
  for (const [from, output, to, input] of spec.links) {
    const source = byId[from], target = byId[to];
    const out = source.outputs.findIndex((o) => o.name === output);
    const inp = target.inputs.findIndex((i) => i.name === input);
    if (out < 0 || inp < 0) throw new Error(`${spec.name}: no ${source.type}.${output} -> ${target.type}.${input}`);
    if (!source.connect(out, target, inp)) throw new Error(`${spec.name}: cannot link ${source.type}.${output} -> ${target.type}.${input}`);
  }
  app.graph.setDirtyCanvas(true, true);
}

const { url, out } = await readStdinJson();
const { browser, page, problems } = await openComfy(url);
const written = [];
try {
  mkdirSync(join(out, "api"), { recursive: true });
  for (const spec of SPECS) {
    await page.evaluate(build, spec);
    const { workflow, prompt } = await page.evaluate(async () => {
      const workflow = window.app.graph.serialize();
      const { output } = await window.app.graphToPrompt();
      return { workflow, prompt: output };
    });
    writeFileSync(join(out, `${spec.name}.json`), JSON.stringify(workflow, null, 2) + "\n");
    writeFileSync(join(out, "api", `${spec.name}.json`), JSON.stringify(prompt, null, 2) + "\n");
    written.push(spec.name);
  }
} finally {
  await browser.close();
}
if (problems.length) throw new Error(problems.join("\n"));
console.log(JSON.stringify({ written }));
