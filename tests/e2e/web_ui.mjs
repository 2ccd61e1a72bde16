// Drives the breakglass web UI in Debian's headless Chromium through playwright-core, like a
// reviewer would: log in with a single-use link, open a recorded session and see the player
// render its output, search for a command and jump to it, read a PostgreSQL session's statement
// timeline with its error highlighted and find a statement by search, approve a request, sign
// off a review.
//
// Run by tests/e2e/web.rs with: BASE LOGIN_URL SESSION_ID OUTPUT_TEXT COMMAND_TEXT
// PG_SESSION_ID PG_SQL PG_ERROR REQUEST_ID REVIEW_ID ARTIFACTS WEB_DIR. Exits 1 with the reason on the first failed step; screenshots
// of every step (and of the failure) go to ARTIFACTS.
import { createRequire } from "node:module";
import { mkdirSync } from "node:fs";
import path from "node:path";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`missing environment variable ${k}`);
  return v;
};
const require = createRequire(path.join(env("WEB_DIR"), "package.json"));
const { chromium } = require("playwright-core");

const artifacts = env("ARTIFACTS");
mkdirSync(artifacts, { recursive: true });
const TIMEOUT = 20000;

function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
page.setDefaultTimeout(TIMEOUT);
// The player renders a recording only once its bundle and the cast have loaded: under the full
// suite's load on 2 cores that has taken longer than the default.
const PLAYER_TIMEOUT = 3 * TIMEOUT;
const pageErrors = [];
page.on("pageerror", (e) => pageErrors.push(String(e)));
page.on("console", (m) => { if (m.type() === "error") pageErrors.push(`console: ${m.text()}`); });
let step = "start";
const shot = (name) => page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });

try {
  step = "1-login";
  await page.goto(env("LOGIN_URL"));
  await page.waitForURL(/\/#\/sessions$/);
  await page.locator("#sessions").waitFor();
  const me = await page.locator("#me").textContent();
  check(me.includes("bob"), `the header should name bob, got ${me}`);
  // The link's secret must not stay in the address bar or history.
  check(!page.url().includes("login#"), `the login secret is still in the URL: ${page.url()}`);
  await shot(step);

  step = "2-session-replay";
  const sessionId = env("SESSION_ID");
  await page.locator(`a.session-link[href="#/session/${sessionId}"]`).click();
  await page.locator("#integrity").waitFor();
  const integrity = await page.locator("#integrity").textContent();
  check(integrity === "OK", `integrity should be OK, got ${integrity}`);
  const term = page.locator(".ap-term-text").first();
  await term.waitFor();
  const output = env("OUTPUT_TEXT");
  await page.waitForFunction(
    (want) => [...document.querySelectorAll(".ap-term-text")].some((e) => e.textContent.includes(want)),
    output,
    { timeout: PLAYER_TIMEOUT },
  );
  // Speed control: switching speed remounts the player and it still renders the recording.
  await page.locator("select.speed").first().selectOption("4");
  await page.waitForFunction(
    (want) => [...document.querySelectorAll(".ap-term-text")].some((e) => e.textContent.includes(want)),
    output,
    { timeout: PLAYER_TIMEOUT },
  );
  // Look here first: as many findings as the rules give, each a link into this session.
  await page.locator("#look-here-first").waitFor();
  const links = await page.locator("#look-here-first a.finding-link").evaluateAll((as) => as.map((a) => a.getAttribute("href")));
  check(links.length === Number(env("SESSION_FINDINGS")), `findings listed: ${links.length}, expected ${env("SESSION_FINDINGS")}`);
  check(links.every((h) => h.startsWith(`#/session/${sessionId}`)), `finding links: ${links}`);
  check((await page.locator("#incident-report").count()) === 1, "a reviewer sees the incident report link");
  // Markup typed at the shell is listed as text: no element, no script.
  const cmds = await page.locator(".commands").first().textContent();
  check(cmds.includes("<img src=x onerror=window.__pwned=2><b>cmd</b>"), `the typed markup shows as typed: ${cmds}`);
  check((await page.locator(".commands img, .commands b").count()) === 0, "typed markup became elements");
  check((await page.evaluate(() => window.__pwned)) === undefined, "typed markup ran");
  await shot(step);

  step = "3-search";
  await page.goto(`${env("BASE")}/#/search`);
  const command = env("COMMAND_TEXT");
  await page.locator("#q").fill(command);
  await page.locator("#search-form button").click();
  const hit = page.locator("#hits a.hit-link").first();
  await hit.waitFor();
  const hitRow = await page.locator("#hits tbody tr").first().textContent();
  check(hitRow.includes(command), `the first hit should show ${command}, got ${hitRow}`);
  await shot(`${step}-results`);
  await hit.click();
  await page.waitForURL(new RegExp(`#/session/${sessionId}\\?ch=\\d+&t=`));
  await page.waitForFunction(
    (want) => [...document.querySelectorAll(".ap-term-text")].some((e) => e.textContent.includes(want)),
    command,
    { timeout: PLAYER_TIMEOUT },
  );
  await shot(`${step}-jump`);

  step = "3b-sql-timeline";
  const pgSession = env("PG_SESSION_ID");
  const pgSql = env("PG_SQL");
  await page.goto(`${env("BASE")}/#/session/${pgSession}`);
  await page.locator("#integrity").waitFor();
  const pgIntegrity = await page.locator("#integrity").textContent();
  check(pgIntegrity === "OK", `the PostgreSQL session's integrity should be OK, got ${pgIntegrity}`);
  const sqlTable = page.locator("table.sql").first();
  await sqlTable.waitFor();
  const stmtRows = await sqlTable.locator("tbody tr").allTextContents();
  check(stmtRows.some((r) => r.includes(pgSql)), `the timeline should list ${pgSql}: ${JSON.stringify(stmtRows)}`);
  const errRows = await sqlTable.locator("tbody tr.err").allTextContents();
  check(errRows.length === 1 && errRows[0].includes(env("PG_ERROR")), `exactly one highlighted error row with ${env("PG_ERROR")}: ${JSON.stringify(errRows)}`);
  const colour = (e) => getComputedStyle(e.querySelector("td")).backgroundColor;
  const errColour = await sqlTable.locator("tbody tr.err").first().evaluate(colour);
  const okColour = await sqlTable.locator("tbody tr:not(.err)").first().evaluate(colour);
  check(errColour !== okColour, `the error row should stand out: ${errColour} vs ${okColour}`);
  // A statement holding markup is a row of text.
  check(stmtRows.some((r) => r.includes("<img src=x onerror=window.__pwned=3><b>sql</b>")), `the statement's markup shows as typed: ${JSON.stringify(stmtRows)}`);
  check((await page.locator("table.sql img, table.sql b").count()) === 0, "a statement's markup became elements");
  check((await page.evaluate(() => window.__pwned)) === undefined, "a statement's markup ran");
  await shot(step);
  // So is a search hit on it.
  await page.goto(`${env("BASE")}/#/search`);
  await page.locator("#q").fill("pwned");
  await page.locator("#search-form button").click();
  await page.locator("#hits a.hit-link").first().waitFor();
  const hitsText = await page.locator("#hits").textContent();
  check(hitsText.includes("<img src=x onerror=window.__pwned=3><b>sql</b>") && hitsText.includes("<b>cmd</b>"), `search hits show the markup as text: ${hitsText}`);
  check((await page.locator("#hits img, #hits b").count()) === 0, "search hits' markup became elements");
  check((await page.evaluate(() => window.__pwned)) === undefined, "search hits' markup ran");
  // Search finds the statement and the hit lands on its row.
  await page.goto(`${env("BASE")}/#/search`);
  await page.locator("#q").fill("nosuch");
  await page.locator("#search-form button").click();
  const sqlHit = page.locator("#hits a.hit-link").first();
  await sqlHit.waitFor();
  await sqlHit.click();
  await page.waitForURL(new RegExp(`#/session/${pgSession}\\?ch=\\d+&t=`));
  const focused = page.locator("table.sql tbody tr.hit");
  await focused.waitFor();
  check((await focused.count()) === 1, `exactly one row should be marked, got ${await focused.count()}`);
  const focusedText = await focused.textContent();
  check(focusedText.includes("nosuch"), `the search hit should highlight the statement, got ${focusedText}`);
  await shot(`${step}-search-hit`);

  step = "4-approve";
  await page.goto(`${env("BASE")}/#/requests`);
  const req = env("REQUEST_ID");
  // Markup a requester typed is shown as text: no element, no script.
  const row = page.locator(`tr[data-id="${req}"]`);
  await row.waitFor();
  const rowText = await row.textContent();
  check(rowText.includes("<img src=x onerror=window.__pwned=1> & <b>bold</b>"), `the reason shows as typed: ${rowText}`);
  check((await row.locator("img, b").count()) === 0, "the reason's markup became elements");
  check((await page.evaluate(() => window.__pwned)) === undefined, "the reason's markup ran");
  await row.locator("button.approve").click();
  await page.locator("#decision").waitFor();
  const decision = await page.locator("#decision").textContent();
  check(/approv|grant/i.test(decision), `approval outcome: ${decision}`);
  check((await page.locator(`tr[data-id="${req}"]`).count()) === 0, "the approved request is still listed as pending");
  await shot(step);

  step = "5-sign-off";
  await page.goto(`${env("BASE")}/#/reviews`);
  const review = env("REVIEW_ID");
  const form = page.locator(`form.sign[data-id="${review}"]`);
  await form.locator("textarea[name=findings]").fill("Replayed the session; one echo, nothing else. No policy breach.");
  await form.locator("textarea[name=root_cause]").fill("Disk alert during the incident drill.");
  // A sign-off with a question left open is refused by the form, then by the server.
  await form.locator("input[name=thresholds_met][value=yes]").check();
  await form.locator("input[name=escalation_possible][value=no]").check();
  await form.locator("textarea[name=actions_taken]").fill("Read the disk usage; nothing changed.");
  await form.locator("input[name=procedure_update][value=yes]").check();
  const logged400 = page.waitForEvent("console", {
    predicate: (m) => m.type() === "error" && m.text().includes("status of 400"),
    timeout: 15000,
  });
  await form.locator("button").click();
  await logged400;
  await page.locator("#outcome .error").waitFor();
  const refused = await page.locator("#outcome .error").textContent();
  check(refused.includes("--procedure-change"), `an update without saying which is refused: ${refused}`);
  // That refusal was a 400 the browser logs; it is the one expected.
  const expected = pageErrors.findIndex((e) => e.includes("status of 400"));
  check(expected >= 0, "the refused sign-off should have been a 400");
  pageErrors.splice(expected, 1);
  await form.locator("textarea[name=procedure_change]").fill("Say which disk alert pages whom.");
  await form.locator("button").click();
  await page.locator("#signed").waitFor();
  const signed = await page.locator("#signed").textContent();
  check(signed.includes("signed off"), `sign-off outcome: ${signed}`);
  await shot(step);

  step = "6-reports";
  await page.goto(`${env("BASE")}/#/reports?since=1d&period=day`);
  await page.locator("#totals").waitFor();
  await page.locator("#chart").waitFor();
  const perSystem = await page.locator("#per-system").textContent();
  check(perSystem.includes("web-01"), `the per-system table should list web-01: ${perSystem}`);
  await shot(step);

  check(pageErrors.length === 0, `the page reported errors: ${pageErrors.join(" | ")}`);
  console.log("web UI: all steps passed");
  await browser.close();
} catch (e) {
  await shot(`FAILED-${step}`).catch(() => {});
  const terms = await page.locator(".ap-term-text").allTextContents().catch(() => []);
  console.error(`url: ${page.url()}\nterminal: ${JSON.stringify(terms)}`);
  if (process.env.DEBUG_CAST) {
    const cast = await page.evaluate((id) => fetch(`/api/v1/sessions/${id}/channels/0/cast`).then((r) => r.text()), env("SESSION_ID")).catch((e) => String(e));
    console.error(`cast:\n${cast}`);
    const cmds = await page.evaluate((id) => fetch(`/api/v1/sessions/${id}`).then((r) => r.json()).then((d) => JSON.stringify(d.channels[0].commands)), env("SESSION_ID")).catch((e) => String(e));
    console.error(`commands: ${cmds}`);
  }
  console.error(`web UI step ${step} failed: ${e.message}\npage errors: ${pageErrors.join(" | ")}`);
  await browser.close();
  process.exit(1);
}
