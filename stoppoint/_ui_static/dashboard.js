// stoppoint's dashboard: live updates without a reload. Every second, fetch this page's live part
// (?part=live) and swap in each piece (data-part) whose HTML changed, so that a moving run's progress updates
// while its buttons, unchanged until its status changes, are never replaced under the pointer. A page that
// takes long to build (a run of thousands of steps) is fetched less often: never more than a quarter of the
// time goes to waiting for it, so that open pages cannot pile up work on the server; and a page that does not
// change (a run that ended) is fetched less and less often, down to every 5 seconds.
"use strict";
(function () {
  const live = document.getElementById("live");
  const badge = document.getElementById("connection");
  // delegated: the filters are a live piece, replaced when the store's flows change
  document.addEventListener("change", (event) => {
    if (event.target.matches("select[data-autosubmit]")) event.target.form.submit();
  });
  if (!live || !live.hasAttribute("data-follow")) return; // an error page: nothing to follow
  // What a button did (?said=) is shown once: not by a reload, nor by the live part
  const address = new URL(window.location.href);
  if (address.searchParams.has("said")) {
    address.searchParams.delete("said");
    window.history.replaceState(null, "", address);
  }
  const url = new URL(address);
  url.searchParams.set("part", "live");
  const seen = new Map();
  for (const part of live.querySelectorAll("[data-part]")) seen.set(part.dataset.part, part.outerHTML);

  function show(connected, why) {
    if (!badge) return;
    badge.textContent = connected ? "live" : "disconnected";
    badge.className = connected ? "badge" : "badge off";
    badge.title = connected ? "live updates, every second" : why;
  }

  let quiet = 1000; // grows while nothing changes (a run that ended), back to a second once something does
  let last = null;
  async function refresh() {
    const started = performance.now();
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      const text = await response.text();
      if (!response.ok) throw new Error(text || response.statusText);
      quiet = text === last ? Math.min(quiet * 1.5, 5000) : 1000;
      last = text;
      const fresh = document.createElement("template");
      fresh.innerHTML = text;
      for (const part of fresh.content.querySelectorAll("[data-part]")) {
        const name = part.dataset.part;
        const html = part.outerHTML;
        if (seen.get(name) === html) continue;
        seen.set(name, html);
        const current = live.querySelector(`[data-part="${CSS.escape(name)}"]`);
        if (current) {
          // keep what the reader opened (a step's failed attempts) across the swap
          for (const details of current.querySelectorAll("details[open]")) {
            const row = details.closest("[data-step]");
            const twin = row && part.querySelector(`[data-step="${CSS.escape(row.dataset.step)}"] details`);
            if (twin) twin.open = true;
          }
          current.replaceWith(part);
        }
      }
      show(true);
    } catch (error) {
      show(false, String(error && error.message ? error.message : error));
    }
    window.setTimeout(refresh, Math.max(quiet, 4 * (performance.now() - started)));
  }
  window.setTimeout(refresh, 1000);
})();
