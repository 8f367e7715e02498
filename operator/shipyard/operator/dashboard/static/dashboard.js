// Shipyard dashboard: live updates (one EventSource per page), the list's filter, the actions' confirmation.
// Plain browser JavaScript: no framework, no build step. The server renders every fragment (escaped) it sends.
"use strict";

(function () {
  const body = document.body;
  const page = body.dataset.page;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const live = document.getElementById("live");

  function setLive(text, on) {
    live.textContent = text;
    live.className = "live " + (on ? "on" : "off");
  }

  function fromHTML(html) {
    const t = document.createElement("template");
    t.innerHTML = html.trim();
    return t.content.firstElementChild;
  }

  // --- the list page ---------------------------------------------------------------------------------------------
  function filterRows() {
    const input = document.getElementById("filter");
    const words = input ? input.value.toLowerCase().split(/\s+/).filter(Boolean) : [];
    for (const row of document.querySelectorAll("#rows tr")) {
      const text = row.textContent.toLowerCase();
      row.hidden = !words.every((w) => text.includes(w));
    }
  }

  function updateCount() {
    const rows = document.querySelectorAll("#rows tr");
    document.getElementById("total").textContent = String(rows.length);
    document.getElementById("empty").hidden = rows.length > 0;
    // The phase counts, as the server renders them (its order first, then any other phase).
    const counts = new Map();
    const tones = new Map();
    for (const row of rows) {
      counts.set(row.dataset.phase, (counts.get(row.dataset.phase) || 0) + 1);
      tones.set(row.dataset.phase, row.dataset.tone);
    }
    const list = document.getElementById("counts");
    const order = list.dataset.order.split(",");
    const phases = [...order.filter((p) => counts.has(p)), ...[...counts.keys()].filter((p) => !order.includes(p)).sort()];
    list.replaceChildren(...phases.map((phase) => {
      const item = document.createElement("li");
      const badge = document.createElement("span");
      badge.className = "badge " + tones.get(phase);
      badge.textContent = phase;
      item.append(badge, " " + counts.get(phase));
      return item;
    }));
  }

  function putRow(data) {
    const row = fromHTML(data.html);
    const old = document.getElementById(data.id);
    if (old) {
      old.replaceWith(row);
    } else {
      const tbody = document.getElementById("rows");
      const next = Array.from(tbody.children).find((r) => r.dataset.sort > data.sort);
      tbody.insertBefore(row, next || null);
    }
    updateCount();
    filterRows();
  }

  // --- the model page --------------------------------------------------------------------------------------------
  const config = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };

  function drawCharts(figures) {
    if (!window.Plotly) return;
    for (const [id, figure] of Object.entries(figures)) {
      const div = document.getElementById(id);
      if (div) window.Plotly.react(div, figure.data, figure.layout, config);
    }
  }

  function putSections(data) {
    const focused = document.activeElement && document.activeElement.id;
    for (const [id, html] of Object.entries(data.sections)) {
      const el = document.getElementById(id);
      if (el && el.dataset.html !== html) {
        el.innerHTML = html;
        el.dataset.html = html;
      }
    }
    if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
    drawCharts(data.figures);
  }

  // --- actions ---------------------------------------------------------------------------------------------------
  function confirmAction(text) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
      document.getElementById("confirm-cancel").focus();
    });
  }

  let busy = false;

  async function act(button) {
    if (busy) return; // one action at a time: a second activation while the dialog is open does nothing
    busy = true;
    try {
      await actOnce(button);
    } finally {
      busy = false;
    }
  }

  async function actOnce(button) {
    const action = button.dataset.action;
    const value = button.dataset.value;
    const result = document.getElementById("action-result");
    if (!(await confirmAction(button.dataset.confirm))) {
      result.textContent = "Cancelled.";
      result.className = "result";
      return;
    }
    const payload = action === "rollback" ? { to: value } : action === "retry" ? {} : { version: value };
    result.textContent = "Sending…";
    result.className = "result";
    let answer;
    try {
      const response = await fetch(`/api/models/${body.dataset.model}/${action}`, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(payload),
        credentials: "same-origin",
      });
      answer = await response.json();
    } catch (e) {
      answer = { ok: false, message: `The dashboard did not answer: ${e}` };
    }
    result.textContent = answer.message;
    result.className = "result " + (answer.ok ? "ok" : "bad");
  }

  document.addEventListener("click", (e) => {
    const button = e.target.closest("button[data-action]");
    if (button && !button.disabled) act(button);
  });

  // --- live updates ----------------------------------------------------------------------------------------------
  function connect() {
    const params = new URLSearchParams({ since: body.dataset.seq || "0" });
    if (page === "model") params.set("model", body.dataset.model);
    const source = new EventSource(`/api/stream?${params}`);
    source.addEventListener("state", (e) => {
      const s = JSON.parse(e.data);
      setLive(s.text, s.live);
    });
    source.addEventListener("row", (e) => putRow(JSON.parse(e.data)));
    source.addEventListener("model", (e) => putSections(JSON.parse(e.data)));
    source.addEventListener("gone", (e) => {
      const data = JSON.parse(e.data);
      if (page === "model") {
        document.getElementById("gone").hidden = false;
      } else {
        const row = document.getElementById(data.id);
        if (row) row.remove();
        updateCount();
      }
    });
    source.addEventListener("open", () => setLive("Live", true));
    source.addEventListener("error", () => setLive("Reconnecting…", false));
  }

  document.addEventListener("DOMContentLoaded", () => {
    const input = document.getElementById("filter");
    if (input) input.addEventListener("input", filterRows);
    if (page === "model") {
      for (const id of ["summary", "actions", "steps", "analysis", "timeline", "artifacts", "events"]) {
        const el = document.getElementById(id);
        if (el) el.dataset.html = el.innerHTML;
      }
      drawCharts(JSON.parse(document.getElementById("figures").textContent));
    }
    if (page === "list" || page === "model") connect();
  });
})();
