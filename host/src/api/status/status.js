// Keeps a status page current. The page's event stream says `changed` when one of its runs
// finishes; the page is then fetched again (after the server has counted the run) and its
// content swapped in. Without JavaScript the page is the same, as of when it was loaded;
// without the stream, it is fetched every few minutes.
const main = document.getElementById("status");
const FOLDED_AFTER_MS = 6000;
const BACKSTOP_MS = 5 * 60 * 1000;
let pending = null;

async function refresh() {
  pending = null;
  try {
    const response = await fetch(location.pathname, { headers: { accept: "text/html" } });
    if (!response.ok) return;
    const next = new DOMParser().parseFromString(await response.text(), "text/html");
    const content = next.getElementById("status");
    const current = document.getElementById("status");
    if (content && current) current.replaceWith(content);
  } catch {
    // Offline for a moment: the next change or the backstop tries again.
  }
}

function soon(delay) {
  if (pending === null) pending = setTimeout(refresh, delay);
}

if (main) {
  const events = new EventSource(`${location.pathname}/events`);
  events.addEventListener("changed", () => soon(FOLDED_AFTER_MS));
  setInterval(() => soon(0), BACKSTOP_MS);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") soon(0);
  });
}
