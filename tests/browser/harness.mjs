// Shared by the browser tests and the workflow builder: Debian's chromium, driven by playwright-core,
// on the real ComfyUI frontend that a real server serves.
import { chromium } from "playwright-core";

// Without the background-networking flags chromium keeps dialling Google's hosts, which this network refuses.
const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
  "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"];

// A first visit opens the template browser and a "Nodes 2.0" banner over the canvas; a returning user has
// neither, and that is the user these tests play. Settings live on the server, so every session sets them all
// again (a scenario that switches to Vue nodes or to Chinese leaves nothing behind for the next one).
export const SETTINGS = {
  "Comfy.TutorialCompleted": true,
  "Comfy.Locale": "en",
  "Comfy.VueNodes.Enabled": false,
  "Comfy.Workflow.ShowMissingNodesWarning": true,
  "Comfy.Workflow.ShowMissingModelsWarning": true,
  "Comfy.Minimap.Visible": false,
  "LiteGraph.Canvas.MinFontSizeForLOD": 1, // screenshots of a whole workflow keep their text
  "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
};

// `settings` are set over these defaults before the page loads, as a user's saved settings are.
export async function openComfy(url, { width = 2400, height = 1250, settings = {} } = {}) {
  const response = await fetch(`${url}/api/settings`, { method: "POST", body: JSON.stringify({ ...SETTINGS, ...settings }) });
  if (!response.ok) throw new Error(`POST /api/settings: HTTP ${response.status}`);
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: CHROMIUM_ARGS });
  try {
    const page = await browser.newPage({ viewport: { width, height } });
    const problems = [];
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    await page.goto(url);
    await page.waitForFunction(
      () => window.app?.graph && window.app.extensions?.some((e) => e.name === "comfyui-zimage.workflows"),
      null, { timeout: 120_000 });
    await page.waitForTimeout(500);
    await closeBanners(page);
    return { browser, page, problems };
  } catch (e) {
    await browser.close(); // never leave a chromium behind
    throw e;
  }
}

export async function closeBanners(page) {
  // The release banner's close button; anything else open would be a dialog the test must see.
  const close = page.locator('.bg-gradient-to-r button:has(i[class*="lucide--x"])');
  if (await close.count()) await close.first().click().catch(() => {});
}

// Text of every open dialog (missing nodes, missing models, validation errors, execution errors).
export async function openDialogs(page) {
  return page.evaluate(() => [...document.querySelectorAll(".p-dialog")]
    .filter((d) => d.offsetParent !== null)
    .map((d) => d.innerText.trim().slice(0, 2000)));
}

export async function closeDialogs(page) {
  for (const close of await page.locator(".p-dialog .p-dialog-close-button").all()) await close.click().catch(() => {});
}

// Read the whole of a JSON-answering node process's stdin (the test passes its parameters there).
export async function readStdinJson() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString("utf8") || "{}");
}
