// Keeps a status page current: every `data-refresh` seconds, while the tab is visible, the
// page is fetched again and its content swapped in. Without JavaScript the page is the same,
// as of when it was loaded.
const main = document.getElementById("status");
const every = Number(main?.dataset.refresh || 30) * 1000;

async function refresh() {
  if (document.visibilityState !== "visible") return;
  try {
    const response = await fetch(location.pathname, { headers: { accept: "text/html" } });
    if (!response.ok) return;
    const next = new DOMParser().parseFromString(await response.text(), "text/html");
    const content = next.getElementById("status");
    const current = document.getElementById("status");
    if (content && current) current.replaceWith(content);
  } catch {
    // Offline for a moment: the next round tries again.
  }
}

if (main) {
  setInterval(refresh, every);
  document.addEventListener("visibilitychange", refresh);
}
