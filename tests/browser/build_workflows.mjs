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

const REAL_FILES = `## Switch to the real Z-Image files
This workflow runs on the **nano** models that ship with comfyui-zimage, so it works at once on any machine (tiny, 128 px, simple shapes).

For real pictures put the official files in ComfyUI's model folders:
- \`models/diffusion_models/z_image_turbo_bf16.safetensors\` (Turbo; the base and edit files when released)
- \`models/text_encoders/qwen_3_4b.safetensors\`
- \`models/vae/ae.safetensors\`

\`python3 install.py download\` fetches them (about 20 GB, needs internet). Then choose the model in **Z-Image Checkpoint Loader** and set text_encoder and vae to those files (or \`auto\`). Steps, cfg, shift, sampler and scheduler are wired from the loader, so they follow the model. Set the image size to 1024 × 1024.`;

const PRUNING = `## Faster attention (optional)
**Z-Image Entropy-Pruned Attention** is bypassed (purple). Select it and press **Ctrl+B** to switch it on: after 2 calibration steps it skips the attention heads with the flattest maps. keep_ratio 0.75 is the safe default; 0.6 is faster (see bench/RESULTS.md).`;

const KGEN = `## k_gen
**Z-Image k_gen Probe** records every model call; **Z-Image k_gen Report** shows k_gen = NFE / Δt, the convergence I(t) and its fit after the run, and appends the run to a history in your user folder.`;

const EDIT_NOTE = `## Two ways to edit
The example pictures are in this package's \`workflows/\` folder (\`zimage-edit-example.png\`, \`zimage-inpaint-example.png\`): upload them, or your own, with the *Load Image* nodes' upload button.

**Top: instruction editing** (nano-edit). Upload a picture in *Load Image* and say what to change: 把红色圆形改成绿色, move the square to the left, 删除三角形. The picture enters the model as reference tokens.

**Bottom: masked inpainting** (nano-turbo). Upload a picture with a transparent hole (or right-click *Load Image* → Open in MaskEditor and paint one) and describe what goes there. Pixels outside the mask are kept exactly.`;

const SPEED_NOTE = `## Turbo speed test
Measures generation kinetics: k_gen = NFE / Δt, Δt from the first model call to the last (loading is not counted), with a batch of 4 at a fixed seed. Run it several times: each run joins the history (label turbo-speed-test) and, once runs at 3 GPU temperatures exist, the report fits Arrhenius (E_a/R). On a GPU the report adds peak memory, temperature, clock and power. Images go to the temp folder only.`;

const QUALITY_NOTE = `## Base quality benchmark
Runs the base model the way quality is judged (30 steps, cfg 4, negative prompt, fixed seed) and reports how the picture converges: I(t) on the latent and on its RGB preview, t₁ (when I reaches 0.95) and the fit 1/(1−I) = k_gen·C_text·t + b, with C_text from the prompt's real token statistics. Compare runs of the same prompt and seed across settings: the history keeps every run.`;

// One spec per workflow, laid out in rows of columns (the builder stacks each column from the nodes' real
// sizes, so nothing overlaps). Node: [id, type, {widgets}, {title, mode, h}]; note: ["note", id, markdown, h];
// column: [width, ...items]; row: {title, color, columns}; links: [from id, output name, to id, input name].
const BYPASS = 4; // LiteGraph's mode for a node that passes its input through
const loader = (id, model) => [id, "ZImageCheckpointLoader", { model, ...NANO }, {}];
const pruning = (id) => [id, "ZImageEntropyPrunedAttention", {}, { mode: BYPASS, title: "Z-Image Entropy-Pruned Attention (Ctrl+B: on)" }];
const sampler = (id, seed, widgets = {}) => [id, "KSampler", { seed, control_after_generate: "fixed", denoise: 1.0, ...widgets }, {}];
const REPORT_W = 560;

function textToImage({ name, model, text, negative, steps = null, batch = 1, label, imageSpace = false, preview = false, prefix, note = null }) {
  const negativeNode = negative === null
    ? [4, "ConditioningZeroOut", {}, { title: "Negative (not used at cfg 1)" }]
    : [4, "ZImageChineseTextEncode", { text: negative }, { title: "Negative prompt", h: 150 }];
  const columns = [
    [360, loader(1, model), [3, "ZImageChineseTextEncode", { text }, { title: "Positive prompt", h: 190 }], ...(negative === null ? [] : [negativeNode])],
    [320, [2, "ModelSamplingAuraFlow", {}, {}], pruning(9), [10, "ZImageKGenProbe", { label }, {}], ...(negative === null ? [negativeNode] : [])],
    [300, [5, "EmptySD3LatentImage", { width: 128, height: 128, batch_size: batch }, { title: "Image size" }],
      sampler(6, 42, steps === null ? {} : { steps })],
    [320, [7, "ZImageTiledVAEDecode", {}, {}],
      preview ? [8, "PreviewImage", {}, { h: 320 }] : [8, "SaveImage", { filename_prefix: prefix }, { h: 320 }]],
    [REPORT_W, [11, "ZImageKGenReport", { image_space: imageSpace }, { h: 560 }], ["note", 22, KGEN, 110]],
    [400, ["note", 20, REAL_FILES, 330], ["note", 21, PRUNING, 150], ...(note ? [["note", 23, note, 250]] : [])],
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
    label: "turbo-speed-test", preview: true, note: SPEED_NOTE }),
  textToImage({ name: "zimage-base-quality-benchmark", model: BASE, text: "黑色背景上左边的一个紫色三角形", negative: "模糊，变形",
    steps: 30, label: "base-quality-benchmark", imageSpace: true, prefix: "zimage-base-quality", note: QUALITY_NOTE }),
  {
    name: "zimage-edit",
    rows: [
      { // Instruction editing with nano-edit: the picture enters as reference latent tokens.
        title: "Instruction editing (nano-edit)", color: "#3f789e",
        columns: [
          [360, loader(1, EDIT), [3, "ZImageChineseTextEncode", { text: "把红色圆形改成绿色" }, { title: "Instruction", h: 160 }],
            [4, "ZImageChineseTextEncode", { text: "" }, { title: "Negative prompt", h: 130 }]],
          [320, [2, "ModelSamplingAuraFlow", {}, {}], pruning(9), [10, "ZImageKGenProbe", { label: "zimage-edit" }, {}]],
          [300, [12, "LoadImage", { image: "zimage-edit-example.png" }, { title: "Picture to edit", h: 330 }], [13, "ZImageTiledVAEEncode", {}, {}]],
          [300, [14, "ReferenceLatent", {}, { title: "Reference (positive)" }], [15, "ReferenceLatent", {}, { title: "Reference (negative)" }],
            sampler(6, 42)],
          [300, [7, "ZImageTiledVAEDecode", {}, {}], [8, "SaveImage", { filename_prefix: "zimage-edit" }, { h: 300 }]],
          [REPORT_W, [11, "ZImageKGenReport", {}, { h: 560 }]],
          [420, ["note", 20, EDIT_NOTE, 260], ["note", 21, REAL_FILES, 400], ["note", 22, PRUNING, 170]],
        ],
      },
      { // Masked inpainting with nano-turbo: the upload's transparent pixels are repainted, the rest kept.
        title: "Masked inpainting (nano-turbo)", color: "#8a8a3f",
        columns: [
          [360, loader(31, TURBO), [33, "ZImageChineseTextEncode", { text: "一个绿色圆形" }, { title: "What goes in the hole", h: 160 }]],
          [320, [32, "ModelSamplingAuraFlow", {}, {}], [34, "ConditioningZeroOut", {}, { title: "Negative (not used at cfg 1)" }]],
          [300, [35, "LoadImage", { image: "zimage-inpaint-example.png" }, { title: "Picture with a transparent hole", h: 330 }],
            [36, "ZImageTiledVAEEncode", {}, {}]],
          [300, [37, "SetLatentNoiseMask", {}, {}], sampler(38, 3)],
          [300, [39, "ZImageTiledVAEDecode", {}, {}], [40, "ImageCompositeMasked", { x: 0, y: 0, resize_source: false }, { title: "Keep the pixels outside the hole" }]],
          [320, [41, "SaveImage", { filename_prefix: "zimage-inpaint" }, { h: 300 }]],
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
          const [, id, text, h] = item;
          node = add(id, LiteGraph.registered_node_types.MarkdownNote ? "MarkdownNote" : "Note");
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
