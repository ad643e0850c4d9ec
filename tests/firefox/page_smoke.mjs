// The bundled page in Debian's Firefox ESR, driven over WebDriver BiDi by puppeteer-core (no
// geckodriver, no downloaded browser). Used by tests/test_page_firefox.py:
//
//   node tests/firefox/page_smoke.mjs http://127.0.0.1:PORT [--hold-ms=1500] [--device-rate=HZ]
//
// Opens the page with Firefox's fake microphone (a 1 kHz tone), picks push-to-talk, connects,
// holds the talk button for --hold-ms, releases, and waits until the echoed answer has been
// played in full. --device-rate makes the (mock) audio device run at that rate, as a 48 kHz
// sound card would; without it Firefox picks its own (44.1 kHz). Prints one JSON line (what the
// page showed and counted) and exits 0; on any failure prints the error, the page's console and
// its state to stderr and exits 1 (2 for bad arguments).

import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import puppeteer from "puppeteer-core";

const FIREFOX = process.env.FIREFOX || "/usr/bin/firefox-esr";
const WAIT_MS = 20_000; // every wait for the page
const DEADLINE_MS = 50_000; // the whole run (tests/test_page_firefox.py waits 60 s)
const USAGE = "usage: node page_smoke.mjs RELAY_HTTP_URL [--hold-ms=MS] [--device-rate=HZ]";
const [url, ...rest] = process.argv.slice(2);
const flags = Object.fromEntries(rest.map((arg) => arg.replace(/^--/, "").split("=", 2)));
const holdMs = Number(flags["hold-ms"] ?? 1500);
const deviceRate = flags["device-rate"] === undefined ? null : Number(flags["device-rate"]);
if (!url || !(holdMs > 0) || (deviceRate !== null && !(deviceRate > 0))) {
  console.error(USAGE);
  process.exit(2);
}

const PREFS = {
  // Fake media: getUserMedia gets a generated tone without a prompt.
  "media.navigator.streams.fake": true,
  "media.navigator.permission.disabled": true,
  "media.navigator.audio.fake_frequency": 1000, // Hz (the default, stated for the test)
  "media.autoplay.default": 0, // allowed
  "media.autoplay.blocking_policy": 0,
  // No sound card here (nor on CI): Firefox's AudioContext.resume() never settles without an
  // output device. Firefox's mock audio backend renders in real time into nothing instead; the
  // context then runs at the backend's preferred rate (44.1 kHz), not 24 kHz.
  "media.cubeb.force_mock_context": true,
  // Offline and quiet: nothing but the page talks to the network.
  "network.connectivity-service.enabled": false,
  "network.captive-portal-service.enabled": false,
  "network.dns.disablePrefetch": true,
  "network.prefetch-next": false,
  "app.update.enabled": false,
  "app.update.auto": false,
  "app.normandy.enabled": false,
  "browser.safebrowsing.malware.enabled": false,
  "browser.safebrowsing.phishing.enabled": false,
  "browser.safebrowsing.downloads.enabled": false,
  "browser.safebrowsing.blockedURIs.enabled": false,
  "browser.safebrowsing.provider.mozilla.updateURL": "",
  "browser.safebrowsing.provider.google4.updateURL": "",
  "datareporting.healthreport.uploadEnabled": false,
  "datareporting.policy.dataSubmissionEnabled": false,
  "toolkit.telemetry.enabled": false,
  "toolkit.telemetry.unified": false,
  "toolkit.telemetry.server": "",
  "toolkit.telemetry.archive.enabled": false,
  "browser.ping-centre.telemetry": false,
  "extensions.update.enabled": false,
  "extensions.getAddons.cache.enabled": false,
  "extensions.blocklist.enabled": false,
  "services.settings.server": "",
  "browser.newtabpage.enabled": false,
  "browser.startup.homepage_override.mstone": "ignore",
};

const consoleLines = []; // "type: text" of every console message and page error

/** `promise`, or undefined once `ms` have passed. */
const within = (promise, ms) =>
  Promise.race([promise, new Promise((resolve) => setTimeout(resolve, ms).unref())]);

// The run ends by itself before the caller's deadline, and on SIGTERM/SIGINT, cleaning up both.
const stopped = new Promise((_, reject) => {
  for (const signal of ["SIGTERM", "SIGINT"]) {
    process.once(signal, () => reject(new Error(`stopped by ${signal}`)));
  }
  setTimeout(() => reject(new Error(`not done in ${DEADLINE_MS} ms`)), DEADLINE_MS).unref();
});

async function main() {
  const profile = await mkdtemp(path.join(os.tmpdir(), "relay-firefox-"));
  let browser;
  let page;
  try {
    const launching = puppeteer.launch({
      browser: "firefox",
      executablePath: FIREFOX,
      headless: true,
      userDataDir: profile, // a fresh profile, removed below
      extraPrefsFirefox: deviceRate ? { ...PREFS, "media.cubeb.force_sample_rate": deviceRate } : PREFS,
      timeout: WAIT_MS,
      protocolTimeout: WAIT_MS * 2,
      handleSIGINT: false, // handled here: close Firefox, remove the profile, exit 1
      handleSIGTERM: false,
      handleSIGHUP: false,
    });
    launching.then((launched) => (browser = launched)).catch(() => {});
    browser = await Promise.race([launching, stopped]);
    page = (await browser.pages())[0] || (await browser.newPage());
    page.setDefaultTimeout(WAIT_MS);
    page.on("console", (message) => consoleLines.push(`${message.type()}: ${message.text()}`));
    page.on("pageerror", (error) => consoleLines.push(`pageerror: ${error?.message || error}`));
    return await Promise.race([run(browser, page), stopped]);
  } catch (error) {
    const state = page ? await within(snapshot(page).catch(() => null), 3000) : null;
    console.error(`page_smoke failed: ${error?.stack || error}`);
    console.error(JSON.stringify({ console: consoleLines, page: state ?? null }));
    return 1;
  } finally {
    if (browser && (await within(browser.close().then(() => true, () => false), 5000)) !== true) {
      browser.process()?.kill("SIGKILL");
    }
    await rm(profile, { recursive: true, force: true }).catch(() => {});
  }
}

/** What the page shows and counts right now. */
async function snapshot(page) {
  return page.evaluate(() => {
    const texts = (selector) =>
      [...document.querySelectorAll(selector)].map((el) => ({
        item: el.dataset.item,
        text: el.querySelector(".text")?.textContent ?? "",
      }));
    return {
      status: document.querySelector("#status").textContent,
      state: document.querySelector("#status").dataset.state,
      error: document.querySelector("#error").hidden ? "" : document.querySelector("#error").textContent,
      stats: window.relayStats ? JSON.parse(JSON.stringify(window.relayStats)) : null,
      user: texts(".turn.user"),
      assistant: texts(".turn.assistant"),
      userAgent: navigator.userAgent,
    };
  });
}

const stateIs = (page, state) =>
  page.waitForFunction((s) => document.querySelector("#status").dataset.state === s, {}, state);

async function run(browser, page) {
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => document.querySelector("#model").options.length > 0);

  // Push-to-talk, by its label as a person would.
  const [ptt] = await page.$$("xpath/.//label[contains(., 'Push-to-talk')]");
  if (!ptt) throw new Error("no 'Push-to-talk' choice on the page");
  await ptt.click();
  await page.waitForFunction(() => document.querySelector('input[name="mode"][value="ptt"]').checked);

  await page.click("#connect");
  await stateIs(page, "listening");
  // The talk button is enabled once the session is live.
  await page.waitForFunction(() => !document.querySelector("#ptt").disabled);

  // Hold the talk button with the mouse (pointerdown ... pointerup) while the fake tone plays.
  const button = await page.$("#ptt");
  const box = await button.boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.mouse.down();
  const pressed = performance.now();
  await page.waitForFunction(() => document.querySelector("#ptt").ariaPressed === "true");
  await new Promise((resolve) => setTimeout(resolve, Math.max(0, holdMs - (performance.now() - pressed))));
  await page.mouse.up();
  const held = performance.now() - pressed;

  // The echo: its transcript, then every received sample played, then back to listening.
  await page.waitForFunction(
    () => [...document.querySelectorAll(".turn.assistant .text")].some((el) => el.textContent.includes("You said")),
  );
  await page.waitForFunction(() => {
    const items = Object.values(window.relayStats?.items || {});
    return items.length > 0 && items.every((i) => i.receivedSamples > 0 && i.playedSamples === i.receivedSamples);
  });
  await stateIs(page, "listening");

  const seen = await snapshot(page);
  const result = {
    ...seen,
    contextRate: seen.stats.contextRate,
    heldMs: Math.round(held),
    browserVersion: await browser.version(),
    console: consoleLines,
  };
  console.log(JSON.stringify(result));
  return 0;
}

process.exit(await main()); // at once: nothing is left to wait for
