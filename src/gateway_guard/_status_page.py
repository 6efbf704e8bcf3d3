"""The status page's HTML: a self-contained shell that fetches its data as JSON.

The page itself holds no data (the service's brand name only), so it may be served to
anyone; its script fetches the JSON, sending a bearer token typed into the page when the
server asks for one (kept in ``sessionStorage``, never in a cookie). No external asset:
inline CSS and JavaScript, allowed by their SHA-256 hashes in the page's
Content-Security-Policy and by nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json

from ._colours import ink

__all__ = ["StatusPage"]

_CSS = """
:root{--accent:%(accent)s;--ink:#111827;--muted:#4b5563;--line:#d1d5db;--bg:#f9fafb}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--ink);background:var(--bg)}
header{background:#fff;border-bottom:4px solid var(--accent);padding:1rem 1.25rem}
h1{font-size:1.35rem;margin:0}
h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
h3{font-size:1rem;margin:1rem 0 .5rem}
main{padding:0 1.25rem 2rem;max-width:80rem}
p{margin:.25rem 0}
.muted{color:var(--muted)}
.warn{color:#92400e;font-weight:600}
.scroll{overflow-x:auto;background:#fff;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;width:100%%;font-size:.9rem}
th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid var(--line);
white-space:nowrap}
th{background:#f3f4f6}
.state{font-weight:600}
.state-closed{color:#166534}.state-open,.state-forced_open{color:#991b1b}
.state-half_open{color:#92400e}.state-disabled{color:#374151}
form{display:flex;flex-wrap:wrap;gap:.5rem;align-items:end;margin:.5rem 0}
label{display:flex;flex-direction:column;font-size:.85rem;color:var(--muted)}
input{font:inherit;padding:.35rem .5rem;border:1px solid #6b7280;border-radius:4px;
min-width:14rem}
button{font:inherit;padding:.3rem .65rem;border-radius:4px;border:1px solid var(--link);
background:#fff;color:var(--link);cursor:pointer}
button.primary{background:var(--link);color:#fff}
:focus-visible{outline:3px solid var(--link);outline-offset:2px}
.actions{display:flex;gap:.3rem}
#message{min-height:1.5em}
pre{background:#fff;border:1px solid var(--line);padding:.75rem;overflow-x:auto}
pre:empty{display:none}
"""

_SCRIPT = r"""
(function(){
"use strict";
var base = document.body.getAttribute("data-base");
var key = "gateway_guard_token";
function token(){ return sessionStorage.getItem(key) || ""; }
function headers(){
  var h = {"Accept": "application/json"};
  if (token()) { h["Authorization"] = "Bearer " + token(); }
  return h;
}
function say(text){ document.getElementById("message").textContent = text; }
function cell(row, text, cls){
  var td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) { td.className = cls; }
  row.appendChild(td);
  return td;
}
function fill(id, rows){
  var body = document.getElementById(id);
  while (body.firstChild) { body.removeChild(body.firstChild); }
  rows.forEach(function(r){ body.appendChild(r); });
}
function pct(x){ return (100 * x).toFixed(1) + "%"; }
function cap(text){ return text.charAt(0).toUpperCase() + text.slice(1); }
function rowHead(row, text){
  var th = document.createElement("th");
  th.scope = "row"; th.textContent = text; row.appendChild(th);
}
function fleet(data){
  var f = data.fleet, p = data.process, box = document.getElementById("fleet-tables");
  var who = p.id ? p.id + " (pid " + p.pid + ")" : "pid " + p.pid;
  var scope = document.getElementById("scope"), note = document.getElementById("fleet-note");
  scope.className = data.note ? "warn" : "";
  // The note names the answering process itself.
  scope.textContent = data.note ? cap(data.note) + "." : "Answered by process " + who +
    ". Breaker states are the fleet's; the Upstreams table counts this process's calls, " +
    "the Fleet section adds up every live process.";
  if (!f || !f.available) {
    box.hidden = true;
    note.className = f ? "warn" : "muted";
    note.textContent = f ? cap(f.note) + ": the numbers above are this process's." :
      "Not shared: with the local backend each worker process keeps its own breakers, " +
      "counts and recent errors. With [state] backend = \"redis\" this section shows " +
      "every live process.";
    return;
  }
  box.hidden = false;
  note.className = "muted";
  note.textContent = f.processes.length + " live process" +
    (f.processes.length === 1 ? "" : "es") + ", read from Redis " + f.read_ago.toFixed(1) +
    " s ago" + (f.errors_not_shared ? "; " + f.errors_not_shared +
    " gateway errors recorded here could not be shared" : "") + ".";
  fill("fleet-upstreams", Object.keys(data.upstreams).map(function(name){
    var u = data.upstreams[name], t = u.fleet, tr = document.createElement("tr");
    rowHead(tr, name);
    if (t) {
      [t.processes, t.calls, t.failures, pct(t.failure_rate), t.slow_calls, t.in_flight]
        .forEach(function(v){ cell(tr, v); });
    } else { [1, 2, 3, 4, 5, 6].forEach(function(){ cell(tr, null); }); }
    cell(tr, u.calls); cell(tr, pct(u.failure_rate));
    return tr;
  }));
  var rows = [];
  f.processes.forEach(function(q){
    var label = (q.host ? q.host + " \u00b7 " : "") + q.id + (q.this_process ? " (this one)" : "");
    var names = Object.keys(q.upstreams);
    (names.length ? names : [null]).forEach(function(name){
      var c = name === null ? {} : q.upstreams[name], tr = document.createElement("tr");
      rowHead(tr, label); cell(tr, q.pid); cell(tr, q.last_seen.toFixed(1) + " s");
      cell(tr, name); cell(tr, c.calls); cell(tr, c.failures); cell(tr, c.slow_calls);
      cell(tr, c.in_flight);
      rows.push(tr);
    });
  });
  fill("processes", rows);
}
function act(name, action){
  fetch(base + "/upstreams/" + encodeURIComponent(name) + "/" + action,
        {method: "POST", headers: headers(), credentials: "omit"})
    .then(function(r){
      if (!r.ok) {
        say(action + " " + name + ": refused (" + r.status + "), check the token");
        return;
      }
      say(action + " " + name + ": done"); load();
    }, function(){ say("The server did not answer."); });
}
function render(data){
  document.getElementById("service").textContent = data.service + " (" + data.backend + ")";
  var up = Object.keys(data.upstreams).map(function(name){
    var u = data.upstreams[name], tr = document.createElement("tr");
    var th = document.createElement("th");
    th.scope = "row"; th.textContent = name; tr.appendChild(th);
    cell(tr, u.state.replace("_", " "), "state state-" + u.state);
    cell(tr, pct(u.failure_rate)); cell(tr, pct(u.slow_call_rate)); cell(tr, u.calls);
    cell(tr, u.half_open_in === null ? "-" : u.half_open_in.toFixed(1) + " s");
    cell(tr, u.retry_budget.left);
    var limit = u.bulkhead.limit === null ? "\u221e" : u.bulkhead.limit;
    cell(tr, u.bulkhead.in_flight + " / " + limit);
    var td = cell(tr, ""), box = document.createElement("div"); box.className = "actions";
    ["force-open", "force-closed", "disable", "reset"].forEach(function(a){
      var b = document.createElement("button"); b.type = "button"; b.textContent = a;
      b.setAttribute("aria-label", a + " " + name);
      b.addEventListener("click", function(){ act(name, a); }); box.appendChild(b);
    });
    td.appendChild(box);
    return tr;
  });
  fill("upstreams", up);
  fleet(data);
  fill("routes", Object.keys(data.routes).map(function(name){
    var r = data.routes[name], tr = document.createElement("tr");
    var th = document.createElement("th"); th.scope = "row";
    th.textContent = name === "*" ? "whole app" : name; tr.appendChild(th);
    cell(tr, r.in_flight + " / " + (r.limit === null ? "\u221e" : r.limit));
    cell(tr, r.queued + " / " + r.queue_limit); cell(tr, r.shed);
    return tr;
  }));
  document.getElementById("errors-scope").textContent =
    data.recent_errors_scope === "fleet" ? " (fleet)" : " (this process)";
  fill("errors", data.recent_errors.map(function(e){
    var tr = document.createElement("tr");
    [e.time, e.reference, e.upstream, e.route || (e.method + " " + e.path), e.status,
     e.proxy_error || ("received-status=" + e.received_status), e.attempts,
     e.elapsed.toFixed(3) + " s"].forEach(function(v){ cell(tr, v); });
    return tr;
  }));
  document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString();
}
function load(){
  fetch(base, {headers: headers(), credentials: "omit"}).then(function(r){
    if (r.status === 401 || r.status === 403) {
      say("This page needs the status token from a non-local address: enter it above.");
      return null;
    }
    return r.json();
  }).then(function(data){ if (data) { render(data); } },
          function(){ say("The server did not answer; retrying."); });
}
function lookup(ref){
  fetch(base + "/errors/" + encodeURIComponent(ref), {headers: headers(), credentials: "omit"})
    .then(function(r){
      if (r.status === 404) {
        return r.json().then(function(b){ return {missing: true, note: b.note}; },
                             function(){ return {missing: true}; });
      }
      return r.ok ? r.json() : {refused: r.status};
    }).then(function(rec){
      var out = document.getElementById("record");
      if (rec.missing) {
        out.textContent = "No recent gateway error has the reference " + ref + "." +
          (rec.note ? " (" + cap(rec.note) + ".)" : "");
      }
      else if (rec.refused) { out.textContent = "Refused (" + rec.refused + "): check the token."; }
      else { out.textContent = JSON.stringify(rec, null, 2); }
    });
}
document.getElementById("token-form").addEventListener("submit", function(ev){
  ev.preventDefault();
  sessionStorage.setItem(key, document.getElementById("token").value);
  say("Token kept for this tab."); load();
});
document.getElementById("lookup-form").addEventListener("submit", function(ev){
  ev.preventDefault(); lookup(document.getElementById("reference").value.trim());
});
var m = location.pathname.slice(base.length).match(/^\/errors\/([^\/]{1,128})$/);
if (m) {
  document.getElementById("reference").value = decodeURIComponent(m[1]);
  lookup(decodeURIComponent(m[1]));
}
load();
setInterval(load, 5000);
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>%(title)s</title>
<style>%(css)s</style>
</head>
<body data-base="%(base)s">
<header><h1>%(title)s</h1><p class="muted" id="service">%(service)s</p></header>
<main>
<p id="message" role="status" aria-live="polite"></p>
<p id="scope"></p>
<p class="muted" id="updated">Loading\u2026</p>
<form id="token-form"><label for="token">Status token (needed from other hosts and
for actions)<input id="token" type="password" autocomplete="off"></label>
<button class="primary" type="submit">Use token</button></form>
<h2 id="upstreams-h">Upstreams</h2>
<div class="scroll" tabindex="0" role="region" aria-labelledby="upstreams-h">
<table aria-labelledby="upstreams-h"><thead><tr><th scope="col">Upstream</th>
<th scope="col">Breaker</th><th scope="col">Failure rate</th><th scope="col">Slow calls</th>
<th scope="col">Calls in window</th><th scope="col">Half-open in</th>
<th scope="col">Retries left</th><th scope="col">Bulkhead</th><th scope="col">Actions</th>
</tr></thead><tbody id="upstreams"></tbody></table></div>
<h2 id="fleet-h">Fleet</h2>
<p id="fleet-note" class="muted"></p>
<div id="fleet-tables" hidden>
<h3 id="fleet-upstreams-h">Upstreams across the fleet</h3>
<div class="scroll" tabindex="0" role="region" aria-labelledby="fleet-upstreams-h">
<table aria-labelledby="fleet-upstreams-h"><thead><tr><th scope="col">Upstream</th>
<th scope="col">Processes</th><th scope="col">Calls in window</th>
<th scope="col">Failures</th><th scope="col">Failure rate</th><th scope="col">Slow calls</th>
<th scope="col">In flight</th><th scope="col">This process: calls</th>
<th scope="col">This process: failure rate</th></tr></thead>
<tbody id="fleet-upstreams"></tbody></table></div>
<h3 id="processes-h">Processes</h3>
<div class="scroll" tabindex="0" role="region" aria-labelledby="processes-h">
<table aria-labelledby="processes-h"><thead><tr><th scope="col">Process</th>
<th scope="col">PID</th><th scope="col">Last seen</th><th scope="col">Upstream</th>
<th scope="col">Calls in window</th><th scope="col">Failures</th><th scope="col">Slow calls</th>
<th scope="col">In flight</th></tr></thead><tbody id="processes"></tbody></table></div>
</div>
<h2 id="routes-h">Inbound</h2>
<div class="scroll" tabindex="0" role="region" aria-labelledby="routes-h">
<table aria-labelledby="routes-h"><thead><tr><th scope="col">Route</th>
<th scope="col">In flight</th><th scope="col">Queued</th><th scope="col">Shed</th>
</tr></thead><tbody id="routes"></tbody></table></div>
<h2 id="errors-h">Recent gateway errors<span id="errors-scope"></span></h2>
<form id="lookup-form"><label for="reference">Reference from an error page
<input id="reference" maxlength="128" autocomplete="off"></label>
<button type="submit">Find</button></form>
<pre id="record" aria-live="polite"></pre>
<div class="scroll" tabindex="0" role="region" aria-labelledby="errors-h">
<table aria-labelledby="errors-h"><thead><tr><th scope="col">Time (UTC)</th>
<th scope="col">Reference</th><th scope="col">Upstream</th><th scope="col">Request</th>
<th scope="col">Status</th><th scope="col">Error</th><th scope="col">Attempts</th>
<th scope="col">Elapsed</th></tr></thead><tbody id="errors"></tbody></table></div>
</main>
<script>%(script)s</script>
</body>
</html>
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


class StatusPage:
    """The page for one Guard, rendered once: its body and its Content-Security-Policy."""

    __slots__ = ("body", "csp")

    def __init__(self, *, service: str, brand: str, accent: str, base: str) -> None:
        link = ink(accent, "#ffffff", "#000000")
        css = (_CSS % {"accent": accent}).replace(":root{", f":root{{--link:{link};", 1)
        title = f"{brand or service} \u2014 gateway status"
        # Every interpolated value is escaped: the brand name and service come from
        # settings, but a page must never trust where its text came from.
        self.body = (
            _PAGE
            % {
                "title": html.escape(title),
                "service": html.escape(service),
                "base": html.escape(base),
                "css": css,
                "script": _SCRIPT,
            }
        ).encode()
        self.csp = (
            f"default-src 'none'; style-src {_hash(css)}; script-src {_hash(_SCRIPT)}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        )


def json_body(data: object) -> bytes:
    """Compact JSON, ASCII only (``<`` escaped too: never read as markup)."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").encode()
