// saga-celery dashboard: a page that can change (a running saga, the list) asks its JSON API
// every data-refresh ms whether it changed (the X-Saga-Revision header against the
// page's data-revision) and, when it did, swaps in the page's new <main>.  A page without
// data-refresh (a finished saga) never polls.
(function () {
  "use strict";

  function current() {
    return document.querySelector("main[data-refresh]");
  }

  function swap() {
    return fetch(location.href, { credentials: "same-origin" })
      .then(function (response) { return response.text(); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        var old = document.querySelector("main");
        if (fresh && old) { old.replaceWith(fresh); }
      });
  }

  function poll() {
    var main = current();
    if (!main) { return; }
    var every = parseInt(main.getAttribute("data-refresh"), 10) || 1500;
    window.setTimeout(function () {
      var page = current();
      if (!page) { return; }
      fetch(page.getAttribute("data-api"), {
        credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store"
      })
        .then(function (response) {
          var revision = response.headers.get("X-Saga-Revision");
          if (response.ok && revision && revision !== page.getAttribute("data-revision")) {
            return swap();
          }
          return null;
        })
        .catch(function () { return null; })
        .then(poll);
    }, every);
  }

  poll();
})();
