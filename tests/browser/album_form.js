// The album demo's page in a real headless Chromium (Debian's package, driven by puppeteer-core):
// open `/`, add an album through the form, see it listed with its songs; then a title of only
// spaces is refused with the error on the page. Run by scripts/test-browser, which starts the
// cluster, pgsplit and the app.
//
// Environment: APP_URL (http://127.0.0.1:PORT), CHROMIUM (the browser binary), SCREENSHOT (a
// PNG path for a look at the page afterwards, optional).
'use strict';

const puppeteer = require('puppeteer-core');

const base = process.env.APP_URL;
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

async function main() {
  check(/^http:\/\/127\.0\.0\.1:\d+$/.test(base || ''), `APP_URL is a loopback URL (${base})`);
  const browser = await puppeteer.launch({
    executablePath,
    headless: true,
    args: [
      '--no-sandbox', // we run as root in CI
      '--disable-dev-shm-usage',
      '--disable-gpu',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-extensions',
      // Only 127.0.0.1 may be reached: every other host name fails to resolve.
      '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
    ],
  });
  const offsite = [];
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(30000);
    await page.setRequestInterception(true);
    page.on('request', (req) => {
      const url = new URL(req.url());
      if (url.protocol === 'data:' || url.hostname === '127.0.0.1') {
        req.continue();
      } else {
        offsite.push(req.url());
        req.abort();
      }
    });

    const first = await page.goto(`${base}/`, { waitUntil: 'load' });
    check(first.status() === 200, 'GET / answers 200');
    check((await page.$eval('h1', (h) => h.textContent)) === 'Albums', 'the page shows its heading');

    const title = `Browser album ${Date.now()} <&>`;
    await page.type('#title', title);
    await page.type('#songs', 'Opening\nClosing');
    const [added] = await Promise.all([
      page.waitForNavigation({ waitUntil: 'load' }),
      page.click('button[type="submit"]'),
    ]);
    check(added.status() === 200, 'the form posts and lands on the page again');
    check(page.url() === `${base}/`, `redirected back to / (${page.url()})`);
    const albums = await page.$$eval('#albums > li', (items) =>
      items.map((li) => ({
        title: li.querySelector('a').textContent,
        songs: Array.from(li.querySelectorAll('ol > li')).map((s) => s.textContent),
      })),
    );
    const mine = albums.find((a) => a.title === title);
    check(mine !== undefined, `the new album "${title}" is listed (${albums.length} listed)`);
    check(JSON.stringify(mine.songs) === JSON.stringify(['Opening', 'Closing']), 'with its songs in order');
    check(albums[0].title === title, 'newest first');

    // Spaces only: the browser's `required` lets it through, the server refuses it.
    await page.type('#title', '   ');
    const [refused] = await Promise.all([
      page.waitForNavigation({ waitUntil: 'load' }),
      page.click('button[type="submit"]'),
    ]);
    check(refused.status() === 400, 'a blank title is refused with 400');
    const error = await page.$eval('.error', (e) => e.textContent);
    check(error.includes('title must not be empty'), `the page says why ("${error}")`);
    const after = await page.$$eval('#albums > li', (items) => items.length);
    check(after === albums.length, 'and nothing was added');

    if (process.env.SCREENSHOT) {
      await page.goto(`${base}/`, { waitUntil: 'load' });
      await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    }
    check(offsite.length === 0, `no request left 127.0.0.1 (${offsite.join(', ')})`);
  } finally {
    await browser.close();
  }
}

main().then(
  () => console.log('album form: 1 passed, 0 failed'),
  (e) => {
    console.error(`FAILED: ${e && e.stack ? e.stack : e}`);
    console.log('album form: 0 passed, 1 failed');
    process.exit(1);
  },
);
