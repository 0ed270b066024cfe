// The dashboard in a real browser: starts `tidegate demo` on free ports,
// opens the dashboard in Debian's headless Chromium, makes the flaky
// upstream fail and checks that its card turns OPEN, restores it and checks
// CLOSED with a recovery time on the timeline; in the events panel, waits
// for a dead letter of the orders topic and redrives it with the admin
// token (the letter leaves the list); the sagas panel shows the demo's
// checkouts completed and compensated. Screenshots go to
// target/artifacts/. Run by scripts/test.sh; TIDEGATE_BIN and CHROMIUM
// override the binary paths.

import { spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const bin = process.env.TIDEGATE_BIN || join(root, "target", "debug", "tidegate");
const browserPath = process.env.CHROMIUM || "/usr/bin/chromium";
const artifacts = join(root, "target", "artifacts");
mkdirSync(artifacts, { recursive: true });

// The demo's flaky breaker: 5 failures in a row open it, 10 s later a probe.
// Its traffic sends a request every 200 ms, each tried 3 times.
const OPEN_WITHIN_MS = 5_000;
const CLOSED_WITHIN_MS = 10_000 + 5_000;

function fail(message) {
  throw new Error(message);
}

/** Starts the demo; resolves with its URLs once it printed them. */
function startDemo() {
  const demo = spawn(bin, ["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, TIDEGATE_LOG: "warn" },
  });
  let output = "";
  let logs = "";
  demo.stderr.on("data", chunk => { logs += chunk; });
  const ready = new Promise((resolve, reject) => {
    demo.stdout.on("data", chunk => {
      output += chunk;
      const flaky = output.match(/curl -X PUT (http:\/\/[0-9.:]+)\/error-rate/);
      const dashboard = output.match(/dashboard: (http:\/\/[0-9.:]+\/)/);
      const token = output.match(/authorization: Bearer ([0-9a-f]+)/);
      if (flaky && dashboard && token && output.includes("Ctrl-C")) {
        resolve({ flaky: flaky[1], dashboard: dashboard[1], token: token[1] });
      }
    });
    demo.on("exit", code => reject(new Error(`demo exited (${code}) before it was ready:\n${output}\n${logs}`)));
  });
  return { demo, ready, logs: () => logs };
}

async function setErrorRate(flaky, rate) {
  const response = await fetch(`${flaky}/error-rate`, { method: "PUT", body: String(rate) });
  if (response.status !== 200) fail(`setting the error rate answered ${response.status}`);
}

async function stateOf(page, upstream) {
  return page.locator(`.card[data-upstream="${upstream}"] .state`).textContent();
}

/** Waits until the flaky card's badge reads `word`; returns the ms it took. */
async function waitForState(page, word, withinMs) {
  const start = Date.now();
  await page
    .locator('.card[data-upstream="flaky"] .state', { hasText: new RegExp(`^${word}$`) })
    .waitFor({ timeout: withinMs })
    .catch(async () => fail(`flaky did not show ${word} within ${withinMs} ms (shows ${await stateOf(page, "flaky")})`));
  return Date.now() - start;
}

// Waits for the flaky card's recovery line to satisfy `ok`; a line that
// never does fails the test with what it said.
async function cardRecovery(page, ok, what) {
  const line = page.locator('.card[data-upstream="flaky"] [data-f="recovery"]');
  const deadline = Date.now() + 5_000;
  let text = "";
  while (Date.now() < deadline) {
    text = (await line.textContent()) || "";
    if (ok(text)) return;
    await page.waitForTimeout(100);
  }
  fail(`the flaky card's recovery line does not show ${what}: "${text}"`);
}

const { demo, ready, logs } = startDemo();
let browser;
let exitCode = 0;
try {
  const urls = await ready;
  browser = await chromium.launch({ executablePath: browserPath, args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    // No network beyond loopback: keep Chromium from trying.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on("pageerror", e => problems.push(`page error: ${e.message}`));
  page.on("console", m => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });

  await page.goto(urls.dashboard);
  await page.locator("#connection.live").waitFor({ timeout: 5_000 });
  for (const name of ["healthy", "flaky", "slow", "events"]) {
    await page.locator(`.card[data-upstream="${name}"]`).waitFor({ timeout: 5_000 });
  }
  await waitForState(page, "CLOSED", 5_000);
  // Live numbers: the demo's traffic shows up as a request rate.
  await page.waitForFunction(
    () => parseFloat(document.querySelector('.card[data-upstream="healthy"] [data-f="rps"]').textContent) > 0,
    null,
    { timeout: 5_000 },
  );

  // The events panel: the orders topic, its groups, and a dead letter
  // (analytics refuses some orders the first time) that a redrive takes
  // back to work.
  await page.locator('#topics tbody tr[data-topic="orders"]').waitFor({ timeout: 5_000 });
  await page.locator('#subscriptions tbody tr[data-subscription="analytics"]').waitFor({ timeout: 5_000 });
  await page.locator('#subscriptions tbody tr[data-subscription="fulfilment"]').waitFor({ timeout: 5_000 });
  const letters = page.locator('.dlq[data-topic="orders.dead"] li');
  await letters.first().waitFor({ timeout: 20_000 })
    .catch(() => fail("no dead letter showed in the events panel"));
  const letterId = await letters.first().getAttribute("data-id");
  const reason = await letters.first().locator(".reason").textContent();
  if (!reason.includes("400")) fail(`the dead letter's reason is "${reason}"`);
  await page.screenshot({ path: join(artifacts, "dashboard-dead-letters.png"), fullPage: true });
  await page.fill("#admin-token", urls.token);
  await page.locator('.dlq[data-topic="orders.dead"] button').click();
  await page.locator('.dlq[data-topic="orders.dead"] .outcome', { hasText: /^redriven [1-9]\d*$/ }).waitFor({ timeout: 5_000 })
    .catch(async () => fail(`the redrive did not go through: ${await page.locator('.dlq[data-topic="orders.dead"] .outcome').textContent()}`));
  await page.locator(`.dlq[data-topic="orders.dead"] li[data-id="${letterId}"]`).waitFor({ state: "detached", timeout: 5_000 })
    .catch(() => fail(`dead letter ${letterId} is still listed after its redrive`));
  console.log(`events panel: dead letter ${letterId} (${reason}) redriven`);

  await setErrorRate(urls.flaky, 1);
  const opened = await waitForState(page, "OPEN", OPEN_WITHIN_MS);
  console.log(`flaky card OPEN ${opened} ms after its error rate went to 100%`);
  await page.locator('#incidents tbody tr[data-upstream="flaky"] .recovery', { hasText: "–" }).waitFor({ timeout: 5_000 });
  await cardRecovery(page, (text) => text.includes("incident under way") && !text.includes("no incident"), "an incident under way, and only that");
  await page.screenshot({ path: join(artifacts, "dashboard-open.png"), fullPage: true });

  await setErrorRate(urls.flaky, 0);
  const closed = await waitForState(page, "CLOSED", CLOSED_WITHIN_MS);
  console.log(`flaky card CLOSED ${closed} ms after its error rate went back to 0%`);
  const recovery = page.locator('#incidents tbody tr[data-upstream="flaky"] .recovery').first();
  await recovery.filter({ hasText: /^\d+(\.\d+)? (s|min)$/ }).waitFor({ timeout: 5_000 })
    .catch(async () => fail(`no recovery time on the timeline: ${await recovery.textContent()}`));
  const seconds = parseFloat(await recovery.textContent());
  if (!(seconds >= 10 && seconds < 60)) fail(`recovery time ${seconds} s is not what the breaker took`);
  const changes = await page.locator("#timeline tbody td.to-closed").count();
  if (changes < 1) fail("the timeline shows no transition to CLOSED");
  if (!(await page.locator("#mttr").textContent()).includes("flaky")) fail("no mean time to recovery for flaky");
  console.log(`timeline: recovery ${seconds} s`);
  await cardRecovery(page, (text) => text.includes("mean time to recovery") && !text.includes("under way") && !text.includes("no incident"), "the recovery the table lists");
  await page.screenshot({ path: join(artifacts, "dashboard-recovered.png"), fullPage: true });

  // The sagas panel: the demo's checkouts, some completed, some
  // compensated (a declined card undoes the reservation).
  const checkout = page.locator('#saga-counts tbody tr[data-saga="checkout"]');
  await checkout.waitFor({ timeout: 10_000 }).catch(() => fail("no checkout saga in the sagas panel"));
  await page.waitForFunction(() => {
    const cells = document.querySelectorAll('#saga-counts tbody tr[data-saga="checkout"] td');
    return cells.length === 5 && Number(cells[2].textContent) > 0 && Number(cells[3].textContent) > 0;
  }, null, { timeout: 15_000 })
    .catch(async () => fail(`the sagas panel shows no completed and no compensated checkout: ${await checkout.textContent()}`));
  if ((await page.locator("#saga-latest tbody tr").count()) < 2) fail("the latest sagas are not listed");
  console.log(`sagas panel: checkout ${(await checkout.locator("td").allTextContents()).slice(1).join(" / ")} (running / completed / compensated / stuck)`);
  await page.screenshot({ path: join(artifacts, "dashboard-sagas.png"), fullPage: true });

  // A phone's width: everything fits without sideways scrolling.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 0) fail(`the page is ${overflow} px wider than a phone`);
  await page.screenshot({ path: join(artifacts, "dashboard-phone.png"), fullPage: true });

  if (problems.length) fail(problems.join("\n"));
  console.log(`dashboard test passed; screenshots in ${artifacts}`);
} catch (e) {
  console.error(e.message);
  console.error(`demo logs:\n${logs()}`);
  exitCode = 1;
} finally {
  if (browser) await browser.close();
  demo.kill("SIGINT");
}
process.exit(exitCode);
