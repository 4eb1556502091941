// A line protocol over Debian's chromium for the Rust tests (tests/src/browser.rs): one JSON
// command per stdin line, one JSON answer per stdout line ({"ok": value} or {"error": text}).
// Commands: goto {url}, wait {selector, state?, timeout_ms}, eval {js} (an expression, awaited),
// wait_fn {js, timeout_ms} (until the expression is truthy), screenshot {path}, close.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const browser = await chromium.launch({
  executablePath: process.env.MXSCOPE_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
const consoleErrors = [];
page.on("pageerror", (e) => consoleErrors.push(String(e)));

async function run(c) {
  switch (c.op) {
    case "goto":
      await page.goto(c.url, { waitUntil: "load" });
      return page.url();
    case "wait":
      await page.waitForSelector(c.selector, { state: c.state || "attached", timeout: c.timeout_ms ?? 10000 });
      return true;
    case "eval":
      return await page.evaluate(`(async () => (${c.js}))()`);
    case "wait_fn": {
      // Polled with evaluate: waitForFunction evaluates a string, which the page's CSP forbids.
      const until = Date.now() + (c.timeout_ms ?? 10000);
      for (;;) {
        if (await page.evaluate(`(() => (${c.js}))()`).catch(() => false)) return true;
        if (Date.now() > until) throw new Error("timed out waiting for " + c.js);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    case "screenshot":
      await page.screenshot({ path: c.path, fullPage: true });
      return c.path;
    case "errors":
      return consoleErrors;
    case "close":
      await browser.close();
      return true;
    default:
      throw new Error("unknown op " + c.op);
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    const c = JSON.parse(line);
    answer = { ok: await run(c) };
    if (c.op === "close") {
      process.stdout.write(JSON.stringify(answer) + "\n");
      process.exit(0);
    }
  } catch (e) {
    answer = { error: String(e && e.message ? e.message : e) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await browser.close();
