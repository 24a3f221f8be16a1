// The gallery page: a lightbox over the thumbnails (← → to move, Esc to close), favourites
// toggled without a reload, and deletion confirmed in a dialog. Without this script every
// link and form still works: thumbnails open the image's page, the favourite form posts and
// comes back, and Delete goes to a confirmation page.
(function () {
  "use strict";
  const grid = document.getElementById("gallery");
  if (!grid) return;
  const hasDialog = typeof HTMLDialogElement === "function";
  const links = Array.from(grid.querySelectorAll("a.open"));

  // --- Lightbox ---------------------------------------------------------------------------
  const box = document.getElementById("lightbox");
  const picture = document.getElementById("lightbox-image");
  const caption = document.getElementById("lightbox-caption");
  const count = document.getElementById("lightbox-count");
  const pageLink = document.getElementById("lightbox-page");
  const prev = document.getElementById("lightbox-prev");
  const next = document.getElementById("lightbox-next");
  let current = -1;

  function show(index) {
    if (index < 0 || index >= links.length) return;
    current = index;
    const link = links[index];
    const thumb = link.querySelector("img");
    // The size is known before the file arrives: the box keeps its shape while it loads.
    picture.width = Number(link.dataset.width);
    picture.height = Number(link.dataset.height);
    picture.src = link.dataset.full;
    picture.alt = thumb ? thumb.alt : "";
    caption.textContent = link.dataset.prompt + " · " + link.dataset.when + " · " + link.dataset.model;
    count.textContent = (index + 1) + " of " + links.length;
    pageLink.href = link.getAttribute("href");
    prev.disabled = index === 0;
    next.disabled = index === links.length - 1;
    const ahead = links[index + 1];
    if (ahead) new Image().src = ahead.dataset.full; // the next one is ready when asked for
  }

  function open(index) {
    show(index);
    if (!box.open) box.showModal();
    next.disabled ? prev.focus() : next.focus();
  }

  function close() {
    if (box.open) box.close();
  }

  if (hasDialog && box) {
    links.forEach(function (link, index) {
      link.addEventListener("click", function (event) {
        if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) {
          return; // a new tab or window: let the browser open the image's page
        }
        event.preventDefault();
        open(index);
      });
    });
    prev.addEventListener("click", function () { show(current - 1); });
    next.addEventListener("click", function () { show(current + 1); });
    document.getElementById("lightbox-close").addEventListener("click", close);
    box.addEventListener("keydown", function (event) {
      if (event.key === "ArrowLeft") { event.preventDefault(); show(current - 1); }
      else if (event.key === "ArrowRight") { event.preventDefault(); show(current + 1); }
      else if (event.key === "Escape") { event.preventDefault(); close(); }
    });
    box.addEventListener("click", function (event) {
      if (event.target === box) close(); // a click on the backdrop
    });
    box.addEventListener("close", function () {
      picture.src = "data:,";
      // Back on the picture the viewer ended on (after the dialog's own focus restore).
      const last = links[current];
      if (last) setTimeout(function () { last.focus(); }, 0);
    });
  }

  // --- Favourites -------------------------------------------------------------------------
  grid.querySelectorAll("form.fav-form").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      const button = form.querySelector("button.fav");
      button.disabled = true;
      fetch(form.action, {
        method: "POST",
        body: new FormData(form),
        headers: { Accept: "application/json", "X-CSRF-Token": grid.dataset.csrf },
      })
        .then(function (response) {
          if (!response.ok) throw new Error(String(response.status));
          return response.json();
        })
        .then(function (answer) {
          const on = Boolean(answer.favorite);
          form.querySelector("input[name=favorite]").value = on ? "0" : "1";
          button.setAttribute("aria-pressed", on ? "true" : "false");
          button.title = on ? "Remove from favourites" : "Add to favourites";
          button.querySelector("span").textContent = on ? "★" : "☆";
          button.disabled = false;
        })
        .catch(function () { form.submit(); }); // the plain form says what went wrong
    });
  });

  // --- Delete, confirmed ------------------------------------------------------------------
  const confirmBox = document.getElementById("confirm-delete");
  const confirmForm = document.getElementById("confirm-delete-form");
  const confirmThumb = document.getElementById("confirm-delete-thumb");
  if (hasDialog && confirmBox) {
    grid.querySelectorAll("a.delete-link").forEach(function (link) {
      link.addEventListener("click", function (event) {
        event.preventDefault();
        const shot = link.closest(".shot");
        const thumb = shot.querySelector("a.open img");
        confirmForm.action = "/images/" + encodeURIComponent(shot.dataset.id) + "/delete";
        confirmThumb.width = thumb.width;
        confirmThumb.height = thumb.height;
        confirmThumb.src = thumb.src;
        confirmBox.showModal();
        document.getElementById("confirm-delete-cancel").focus(); // the safe choice first
      });
    });
    document.getElementById("confirm-delete-cancel").addEventListener("click", function () {
      confirmBox.close();
    });
  }
})();
