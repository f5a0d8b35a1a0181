// Browser scenarios for tests/test_browser.py: `node scenarios.mjs <scenario>` with its parameters as JSON on
// stdin; the last line of stdout is the JSON result the Python test asserts on. Screenshots go to params.out.
import { join } from "node:path";
import { closeBanners, closeDialogs, openComfy, openDialogs, readStdinJson } from "./harness.mjs";

const RUN_TIMEOUT_MS = 600_000;

// Open a bundled workflow the way a user does: the Comfy menu, then Z-Image, then the workflow's entry.
// A submenu opens on hover and can close again when the pointer's path crosses another entry on a busy machine;
// a user would simply point again, and so does this (three tries, then the last error stands).
async function openFromMenu(page, label) {
  const entry = page.getByText(label, { exact: true }).first();
  for (let attempt = 1; ; attempt++) {
    try {
      await closeBanners(page);
      await page.locator(".comfyui-logo").first().click();
      await page.getByText("Z-Image", { exact: true }).first().hover({ timeout: 10_000 });
      await entry.waitFor({ state: "visible", timeout: 10_000 });
      await entry.click({ timeout: 10_000 });
      break;
    } catch (e) {
      if (attempt === 3) throw e;
      await page.keyboard.press("Escape");
      await page.mouse.move(5, 600);
      await page.waitForTimeout(1000);
    }
  }
  await page.waitForFunction(() => window.app.graph._nodes.some((n) => n.comfyClass?.startsWith("ZImage")), null, { timeout: 30_000 });
  await page.waitForTimeout(1000); // dialogs about missing nodes or models open after the graph is configured
}

async function fitView(page) {
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
  await page.waitForTimeout(600);
}

// A close-up of one node: zoom in on it and capture its rectangle.
async function nodeShot(page, nodeType, path, scale = 1.5) {
  const clip = await page.evaluate(([type, scale]) => {
    const { app, LiteGraph } = window;
    const node = app.graph._nodes.find((n) => n.comfyClass === type);
    app.canvas.ds.scale = scale;
    app.canvas.centerOnNode(node);
    app.canvas.setDirty(true, true);
    const ds = app.canvas.ds, box = app.canvas.canvas.getBoundingClientRect(), title = LiteGraph.NODE_TITLE_HEIGHT;
    return { x: box.left + (node.pos[0] + ds.offset[0]) * ds.scale - 16, y: box.top + (node.pos[1] - title + ds.offset[1]) * ds.scale - 16,
      width: node.size[0] * ds.scale + 32, height: (node.size[1] + title) * ds.scale + 32 };
  }, [nodeType, scale]);
  await page.waitForTimeout(700); // DOM widgets follow the canvas on its next frame
  await page.screenshot({ path, clip });
}

// Click Run and wait for this prompt to finish; returns the execution's outcome as the websocket told it.
async function runFromUi(page) {
  await page.evaluate(() => {
    const api = window.app.api;
    window.__zimageRun = { status: "queued", messages: [] };
    for (const type of ["execution_start", "execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(type, (e) => {
        window.__zimageRun.messages.push(type);
        if (type === "execution_start") window.__zimageRun.status = "running";
        else {
          window.__zimageRun.status = type.replace("execution_", "");
          window.__zimageRun.detail = e.detail;
        }
      });
    }
  });
  await page.getByRole("button", { name: "Run", exact: true }).first().click();
  const deadline = Date.now() + RUN_TIMEOUT_MS;
  while (Date.now() < deadline) {
    const run = await page.evaluate(() => window.__zimageRun);
    if (!["queued", "running"].includes(run.status)) return run;
    const dialogs = await openDialogs(page);
    if (dialogs.length && run.status === "queued") return { status: "rejected", dialogs };
    await page.waitForTimeout(500);
  }
  return { status: "timeout" };
}

// Every image-output node's previews, once the browser has loaded them.
async function shownImages(page) {
  await page.waitForFunction(() => window.app.graph._nodes
    .filter((n) => ["SaveImage", "PreviewImage", "ZImageKGenReport"].includes(n.comfyClass) && n.mode === 0)
    .every((n) => n.imgs?.length && n.imgs.every((img) => img.complete && img.naturalWidth > 0)), null, { timeout: 60_000 });
  return page.evaluate(() => window.app.graph._nodes
    .filter((n) => n.imgs?.length)
    .map((n) => ({ id: String(n.id), type: n.comfyClass, images: n.imgs.map((img) => ({ src: new URL(img.src).search, width: img.naturalWidth, height: img.naturalHeight })) })));
}

const scenarios = {
  // Load a bundled workflow from the menu, export it as the frontend does, run it, and show its outputs.
  async workflow(page, { name, label, out }) {
    await openFromMenu(page, label);
    const loadDialogs = await openDialogs(page);
    await closeDialogs(page);
    const exported = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    const tab = await page.evaluate(() => window.app.extensionManager.workflow.activeWorkflow?.filename ?? null);
    const run = await runFromUi(page);
    // The whole graph in view: the canvas loads a node's preview images only when it draws the node, and DOM
    // widgets of nodes outside the view are hidden.
    await fitView(page);
    const images = run.status === "success" ? await shownImages(page) : [];
    const figures = await page.evaluate(() => [...document.querySelectorAll(".zimage-kgen-figures")]
      .map((el) => ({ text: el.textContent, kGen: el.dataset.kGen ?? null, visible: el.offsetParent !== null })));
    await page.screenshot({ path: join(out, `${name}.png`) });
    if (run.status === "success") await nodeShot(page, "ZImageKGenReport", join(out, `${name}-kgen-report.png`), 1.2);
    return { loadDialogs, tab, exported, run: { status: run.status, messages: run.messages, detail: run.detail ?? null, dialogs: run.dialogs ?? [] }, images, figures, afterDialogs: await openDialogs(page) };
  },

  // Type into Z-Image Chinese Text Encode and read the live count the extension shows.
  async tokenCount(page, { label, short, long, out }) {
    await openFromMenu(page, label);
    const node = await page.evaluateHandle(() => window.app.graph._nodes.find((n) => n.comfyClass === "ZImageChineseTextEncode"));
    const textarea = await node.evaluateHandle((n) => n.widgets.find((w) => w.name === "text").inputEl);
    const counter = await node.evaluateHandle((n) => n.widgets.find((w) => w.name === "token_count").element);
    const read = () => counter.evaluate((el) => ({ text: el.textContent, tokens: el.dataset.tokens ?? null, over: el.classList.contains("zimage-over-limit"), visible: el.offsetParent !== null }));
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
    const initial = await read();

    await textarea.click();
    await page.keyboard.press("Control+A");
    await page.keyboard.press("Delete");
    await page.keyboard.type(short, { delay: 20 }); // keystrokes, as a user types
    await page.waitForFunction((el) => el.dataset.tokens !== undefined && el.textContent.includes("weighted"), counter, { timeout: 20_000 });
    const typed = await read();
    await nodeShot(page, "ZImageChineseTextEncode", join(out, "token-count.png"));

    await page.keyboard.press("Control+A");
    await page.keyboard.insertText(long); // a paste
    await page.waitForFunction((el) => el.classList.contains("zimage-over-limit"), counter, { timeout: 20_000 });
    const over = await read();
    await nodeShot(page, "ZImageChineseTextEncode", join(out, "token-count-over-limit.png"));
    const exportedText = await page.evaluate(async () => {
      const { output } = await window.app.graphToPrompt();
      return Object.values(output).find((n) => n.class_type === "ZImageChineseTextEncode").inputs;
    });
    return { initial, typed, over, exportedInputs: Object.keys(exportedText), serialisedText: exportedText.text.length };
  },
};

// The bundled workflows in ComfyUI's template browser, under this package, with their thumbnails. A card's name
// is read from its test id or its heading: newer frontends put badges ("Node graph") above the name.
scenarios.templates = async (page, { packageName, expected, out }) => {
  await page.evaluate(() => {
    window.zimageTemplateCards = () => {
      const tagged = [...document.querySelectorAll("[data-testid^='template-workflow-']")];
      return tagged.length ? tagged : [...document.querySelectorAll(".template-card, [class*='card']")];
    };
    return window.app.extensionManager.command.execute("Comfy.BrowseTemplates");
  });
  await page.getByText(packageName, { exact: true }).first().click({ timeout: 30_000 });
  // The cards and their thumbnails arrive over the network: wait for them (a loaded machine takes seconds), then
  // read whatever is there, so that a missing card fails the test's own assertion with the cards found.
  await page.waitForFunction((expected) => window.zimageTemplateCards().filter((card) =>
    [...card.querySelectorAll("img")].some((img) => img.complete && img.naturalWidth > 0)).length >= expected,
  expected, { timeout: 30_000, polling: 250 }).catch(() => {});
  const cards = await page.evaluate(() => {
    const cards = window.zimageTemplateCards();
    return cards.map((card) => {
      const heading = card.querySelector("h1, h2, h3, h4, [title]:not(img)");
      const name = card.dataset.testid?.replace(/^template-workflow-/, "") || heading?.getAttribute("title") || heading?.textContent.trim()
        || card.innerText.trim().split("\n")[0];
      const badges = [...card.querySelectorAll("span")].filter((el) => !heading?.contains(el))
        .map((el) => el.textContent.trim()).filter((text) => text && text !== name);
      return { name, text: card.innerText.trim().slice(0, 200), badges,
        images: [...card.querySelectorAll("img")].map((img) => ({ src: img.src, loaded: img.complete && img.naturalWidth > 0 })) };
    }).filter((card) => card.images.length);
  });
  await page.screenshot({ path: join(out, "template-browser.png") });
  return { cards };
};

// Fresh nodes of these types, side by side in a new blank workflow, as a user adds them: a loaded workflow keeps
// the titles and colours it was saved with, a new node shows what the frontend and the extensions give it.
async function addFreshNodes(page, types) {
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.NewBlankWorkflow"));
  await page.waitForFunction(() => window.app.graph._nodes.length === 0, null, { timeout: 10_000, polling: 100 });
  const added = await page.evaluate((types) => {
    const { app, LiteGraph } = window;
    const added = {};
    let x = 0;
    for (const type of types) {
      const node = LiteGraph.createNode(type);
      if (!node) continue; // not registered on this ComfyUI
      node.pos = [x, 0];
      x += node.size[0] + 60;
      app.graph.add(node);
      added[type] = String(node.id);
    }
    app.graph.setDirtyCanvas(true, true);
    return added;
  }, types);
  await fitView(page);
  return added;
}

// What the graph holds for each node and, where the frontend renders nodes as DOM (Vue nodes / Nodes 2.0), what
// that DOM shows: its title, the background the node's colour paints, its widgets, whether it is on screen.
async function describeNodes(page) {
  return page.evaluate(() => window.app.graph._nodes.map((n) => {
    const el = document.querySelector(`[data-node-id="${n.id}"]`);
    const titleEl = el?.querySelector("[data-testid='node-title']");
    const painted = el && [el, ...el.querySelectorAll("*")].map((e) => e.style?.getPropertyValue("--component-node-background").trim()).find(Boolean);
    const box = el?.getBoundingClientRect();
    return {
      id: String(n.id), type: n.comfyClass ?? n.type, title: n.getTitle?.() ?? n.title, color: n.color ?? null, bgcolor: n.bgcolor ?? null,
      dom: Boolean(el), domTitle: el ? (titleEl ?? el).innerText.trim().split("\n")[0].trim() : null, domBackground: painted || null,
      domVisible: Boolean(box && box.width > 0 && box.height > 0),
      domWidgets: el ? el.querySelectorAll("textarea, input, select, [role='combobox'], .zimage-token-count").length : 0,
    };
  }));
}

// The images each image-output node shows: the DOM's <img> in Vue nodes mode, else the canvas's node.imgs.
async function shownImagesInDom(page) {
  const types = ["SaveImage", "PreviewImage", "ZImageKGenReport"];
  const read = () => page.evaluate((types) => window.app.graph._nodes
    .filter((n) => types.includes(n.comfyClass) && n.mode === 0)
    .map((n) => {
      const el = document.querySelector(`[data-node-id="${n.id}"]`);
      const imgs = el ? [...el.querySelectorAll("img")] : [];
      return { id: String(n.id), type: n.comfyClass, images: imgs.filter((img) => img.complete && img.naturalWidth > 0 && /\/view\?/.test(img.src))
        .map((img) => ({ src: new URL(img.src).search, width: img.naturalWidth, height: img.naturalHeight })) };
    }), types);
  const deadline = Date.now() + 60_000;
  let shown = await read();
  while (Date.now() < deadline && !shown.every((n) => n.images.length)) {
    await page.waitForTimeout(500);
    shown = await read();
  }
  return shown;
}

// Nodes 2.0: the plugin's nodes render as Vue components, its DOM widgets live in them, and a workflow runs.
scenarios.vueNodes = async (page, { name, label, fresh, out }) => {
  const vueNodes = await page.evaluate(() => window.app.extensionManager.setting.get("Comfy.VueNodes.Enabled"));
  await openFromMenu(page, label);
  await fitView(page);
  const loadDialogs = await openDialogs(page);
  await closeDialogs(page);
  const exported = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  const nodes = await describeNodes(page);
  const counter = await page.evaluate(() => {
    const el = document.querySelector(".zimage-token-count");
    return el ? { text: el.textContent, tokens: el.dataset.tokens ?? null, visible: el.offsetParent !== null,
      inNode: el.closest("[data-node-id]")?.getAttribute("data-node-id") ?? null } : null;
  });
  await page.screenshot({ path: join(out, `vue-nodes-${name}.png`) });
  const run = await runFromUi(page);
  await fitView(page);
  const images = run.status === "success" ? await shownImagesInDom(page) : [];
  const figures = await page.evaluate(() => [...document.querySelectorAll(".zimage-kgen-figures")]
    .map((el) => ({ text: el.textContent, kGen: el.dataset.kGen ?? null, visible: el.offsetParent !== null,
      inNode: el.closest("[data-node-id]")?.getAttribute("data-node-id") ?? null })));
  await page.screenshot({ path: join(out, `vue-nodes-${name}-run.png`) });
  const afterDialogs = await openDialogs(page);
  // New nodes in Vue mode: the plugin's painted in its colour, core's (and other packages') not.
  const added = await addFreshNodes(page, fresh);
  await page.waitForTimeout(1000);
  const freshNodes = await describeNodes(page);
  await page.screenshot({ path: join(out, "vue-nodes-fresh.png") });
  return { vueNodes, loadDialogs, exported, nodes, counter,
    run: { status: run.status, messages: run.messages, detail: run.detail ?? null, dialogs: run.dialogs ?? [] },
    images, figures, afterDialogs, added, freshNodes };
};

// Fresh nodes' titles (what the canvas draws, and the DOM in Vue nodes mode) and colours.
scenarios.freshNodes = async (page, { types, shot, out }) => {
  const added = await addFreshNodes(page, types);
  await page.waitForTimeout(1000);
  const nodes = await describeNodes(page);
  const frontend = await page.evaluate(() => ({
    version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
    locale: window.app.extensionManager.setting.get("Comfy.Locale"),
    vueNodes: window.app.extensionManager.setting.get("Comfy.VueNodes.Enabled"),
  }));
  await page.screenshot({ path: join(out, `${shot}.png`) });
  return { added, nodes, frontend };
};

const [name] = process.argv.slice(2);
const params = await readStdinJson();
let session;
let result;
try {
  session = await openComfy(params.url, { settings: params.settings ?? {} });
  result = await scenarios[name](session.page, params);
} finally {
  await session?.browser.close();
}
console.log(JSON.stringify({ ...result, problems: session.problems }));
