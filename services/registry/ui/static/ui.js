// Shipyard registry UI: the few things a server-rendered page cannot do alone.
"use strict";

// A select marked data-autosubmit sends its form when changed (the metric of a model's chart).
document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
  select.addEventListener("change", function () { select.form.submit(); });
});

// Promotion forms: the canary share field shows only while the canary alias is picked.
document.querySelectorAll("form[data-alias-form]").forEach(function (form) {
  var alias = form.querySelector("select[name=alias]");
  var field = form.querySelector("[data-weight-for]");
  if (!alias || !field) { return; }
  function sync() {
    var on = alias.value === field.getAttribute("data-weight-for");
    field.hidden = !on;
    field.querySelector("input").disabled = !on;
  }
  alias.addEventListener("change", sync);
  sync();
});

// A job's page follows its log: ask the registry (which asks the trainer) for lines after the last.
(function follow() {
  var log = document.getElementById("log");
  if (!log) { return; }
  var terminal = ["succeeded", "failed", "cancelled"];
  var status = document.querySelector("[data-log-status]");
  var after = parseInt(log.getAttribute("data-after"), 10) || 0;
  if (terminal.indexOf(log.getAttribute("data-state")) >= 0) { return; }

  function append(line) {
    var empty = log.querySelector("[data-empty]");
    if (empty) { empty.remove(); }
    var row = document.createElement("span");
    row.className = "line lvl-" + String(line.level || "info").toLowerCase();
    var number = document.createElement("span");
    number.className = "ln";
    number.textContent = line.line;
    var time = document.createElement("span");
    time.className = "t";
    time.textContent = String(line.time || "").slice(11, 19);
    row.append(number, " ", time, " " + line.message);
    log.append(row, "\n");
  }

  function poll() {
    fetch(log.getAttribute("data-follow") + "?after=" + after, {credentials: "same-origin"})
      .then(function (response) {
        if (!(response.headers.get("content-type") || "").includes("json")) { throw new Error("signed out"); }
        return response.json();
      })
      .then(function (body) {
        if (body.error) { status.textContent = body.error + " Retrying…"; setTimeout(poll, 5000); return; }
        var atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
        body.lines.forEach(append);
        after = body.next_after;
        if (atBottom) { log.scrollTop = log.scrollHeight; }
        if (terminal.indexOf(body.state) >= 0) {
          status.textContent = "the job has " + body.state + "; reloading…";
          setTimeout(function () { window.location.reload(); }, 1000);
        } else {
          status.textContent = "following… (" + body.state + ")";
          setTimeout(poll, 2000);
        }
      })
      .catch(function () { status.textContent = "not following: reload the page to sign in again"; });
  }
  setTimeout(poll, 2000);
})();
