// stoppoint's dashboard: live updates without a reload. Every second, fetch this page's live part
// (?part=live) and swap in each piece (data-part) whose HTML changed, so that a moving run's progress updates
// while its buttons, unchanged until its status changes, are never replaced under the pointer. A page that
// takes long to build (a run of thousands of steps) is fetched less often: never more than a quarter of the
// time goes to waiting for it, so that open pages cannot pile up work on the server.
"use strict";
(function () {
  const live = document.getElementById("live");
  const badge = document.getElementById("connection");
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.submit());
  }
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

  async function refresh() {
    const started = performance.now();
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      const text = await response.text();
      if (!response.ok) throw new Error(text || response.statusText);
      const fresh = document.createElement("template");
      fresh.innerHTML = text;
      for (const part of fresh.content.querySelectorAll("[data-part]")) {
        const name = part.dataset.part;
        const html = part.outerHTML;
        if (seen.get(name) === html) continue;
        seen.set(name, html);
        const current = live.querySelector(`[data-part="${CSS.escape(name)}"]`);
        if (current) current.replaceWith(part);
      }
      show(true);
    } catch (error) {
      show(false, String(error && error.message ? error.message : error));
    }
    window.setTimeout(refresh, Math.max(1000, 4 * (performance.now() - started)));
  }
  window.setTimeout(refresh, 1000);
})();
