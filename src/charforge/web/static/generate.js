// The Generate Images page: indicator updates; a generation submitted as a job and followed
// live (place in the queue, sampling steps) over Server-Sent Events, polling the job where the
// stream breaks; cancel; inline errors next to the fields.
(function () {
  "use strict";
  const form = document.getElementById("generate-form");
  if (!form) return;
  const select = document.getElementById("characterId");
  const indicator = document.getElementById("indicator-text");
  const note = document.getElementById("indicator-note");
  const button = document.getElementById("generate-button");
  const cancelButton = document.getElementById("cancel-button");
  const progress = document.getElementById("progress");
  const bar = document.getElementById("progress-bar");
  const announcer = document.getElementById("progress-status");
  const errorBox = document.getElementById("form-error");
  const result = document.getElementById("result");
  const heading = document.getElementById("result-heading");
  const more = document.getElementById("result-more");
  const simulatedBackends = (form.dataset.simulatedBackends || "").split(" ").filter(Boolean);
  const FINAL = ["succeeded", "failed", "cancelled"];
  const POLL_MS = 1000;
  const POLL_GIVE_UP = 15; // failed polls in a row before telling the user
  let current = null; // the job being followed

  const hires = document.getElementById("hires");
  const hiresNote = document.getElementById("hires-note");
  let hiresWanted = hires.checked; // the user's choice, restored for a route that has it
  hires.addEventListener("change", () => { hiresWanted = hires.checked; });

  const identityBox = document.getElementById("identity-box");
  const identitySummary = document.getElementById("identity-summary");
  const strength = document.getElementById("identityStrength");
  const unsupported = document.getElementById("identity-unsupported");
  const retry = document.getElementById("retrySame");
  const transfer = document.getElementById("transferTo");
  const SAME_PERSON = 0.5;
  const RETRY_TRIES = 3;
  // A strength that came with the link ("use these settings again") is kept once.
  let strengthAsked = strength.dataset.asked || "";
  let shownFor = null; // the character whose strength the field shows

  function selectedOption() {
    return select.options[select.selectedIndex] || null;
  }

  function transferOption() {
    const option = transfer.options[transfer.selectedIndex];
    return option && option.value ? option : null;
  }

  function showIndicator() {
    const option = selectedOption();
    const ownStyle = option ? option.getAttribute("data-style") : "";
    // Style transfer offers only the other styles.
    for (const choice of transfer.options) {
      if (!choice.value) continue;
      const own = choice.value === ownStyle;
      choice.hidden = own;
      choice.disabled = own;
    }
    if (transferOption() && transferOption().value === ownStyle) transfer.value = "";
    transfer.options[0].textContent = option
      ? option.textContent.trim() + "'s own style" : "The character's own style";
    const target = transferOption();
    const text = target ? target.getAttribute("data-indicator")
      : option ? option.getAttribute("data-indicator") : "";
    indicator.textContent = text || "";
    note.hidden = !text;
    note.textContent = target
      ? "Style transfer: this image only. " + (option ? option.textContent.trim() : "The character") +
        " keeps its own style."
      : note.dataset.note;
    // A route whose backends have no second pass would refuse hires=true (422): offer only
    // what the character's backends can do.
    const route = target || option;
    const canHires = !route || route.getAttribute("data-hires") !== "0";
    hires.disabled = !canHires;
    hires.checked = canHires && hiresWanted;
    hiresNote.hidden = canHires;
    showIdentity(option, route);
  }

  function showIdentity(option, route) {
    const count = option ? Number(option.getAttribute("data-references") || 0) : 0;
    identityBox.hidden = count < 1;
    if (!option) return;
    const name = option.textContent.trim();
    identitySummary.textContent = name + " has " + (count === 1
      ? "1 reference image; the new image is checked against it."
      : count + " reference images; the new image is checked against them.");
    if (shownFor !== option.value) {
      strength.value = strengthAsked || option.getAttribute("data-strength") || "";
      strengthAsked = "";
      shownFor = option.value;
    }
    const steers = route.getAttribute("data-steers") !== "0";
    strength.disabled = !steers;
    unsupported.hidden = steers;
  }
  select.addEventListener("change", showIndicator);
  // The recent images beside the form are the first character's: not another's.
  const recent = document.getElementById("recent");
  select.addEventListener("change", () => {
    if (recent) recent.hidden = recent.dataset.character !== select.value;
  });
  select.addEventListener("input", showIndicator);
  transfer.addEventListener("change", showIndicator);
  showIndicator();

  function clearErrors() {
    errorBox.hidden = true;
    errorBox.textContent = "";
    form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  }

  // The API's names in messages, in words (as web/identity_view.py does on the pages).
  function plain(text) {
    return String(text || "")
      .replace(/no backend of the (\S+) style can condition on reference images: (.*)/g,
        "the $1 style's backends cannot use reference images: $2")
      .replace(/send identity\.strength ?= ?0/gi, "set the reference strength to 0")
      .replace(/identity\.strength ?= ?0/g, "reference strength 0")
      .replace(/identity\.strength is 0/g, "the reference strength was 0")
      .replace(/identity\.minScore/g, "the same-person retry")
      .replace(/identity\.strength/g, "reference strength")
      .replace(/leave identity out/g, "leave the reference images out")
      .replace(/which this request asks for/g, "which this image asks for");
  }

  function sentence(text) {
    const out = plain(text).trim();
    if (!out) return "";
    const upper = out.charAt(0).toUpperCase() + out.slice(1);
    return /[.!?]$/.test(upper) ? upper : upper + ".";
  }

  // Where an error about a request field is shown: the field's own input.
  function fieldFor(name) {
    if (!name) return null;
    const settings = window.charforgeSettings; // generate-settings.js: templates and presets
    const own = settings && settings.fieldFor(name);
    if (own) return own;
    if (/^identity\.(minScore|maxTries)/.test(name)) return retry;
    if (/^identity/.test(name)) return strength.disabled ? identityBox : strength;
    if (transferOption() && /^(artStyle|styleTransfer|model)/.test(name)) return transfer;
    return document.getElementById(name.split(".")[0]);
  }

  function showError(error) {
    const message = plain(error.message);
    const joiner = /[.!?]$/.test(message) ? " " : ". ";
    errorBox.textContent = message + (error.hint ? joiner + plain(error.hint) : "");
    errorBox.hidden = false;
    const field = fieldFor(error.field);
    if (field) {
      field.setAttribute("aria-invalid", "true");
      field.setAttribute("aria-describedby", "form-error");
      if (field.closest("details")) field.closest("details").open = true;
    }
  }

  function body() {
    const data = { characterId: select.value, prompt: form.prompt.value,
      negativePrompt: form.negativePrompt.value, hires: form.hires.checked,
      nsfw: form.nsfw.checked, sampler: form.sampler.value.trim(),
      scheduler: form.scheduler.value.trim() };
    for (const name of ["width", "height", "steps", "cfgScale", "seed", "count"]) {
      const value = form[name] ? form[name].value.trim() : "";
      if (value !== "") data[name] = Number(value);
    }
    const target = transferOption();
    if (target) {
      data.artStyle = target.value;
      data.styleTransfer = true;
    }
    if (!identityBox.hidden) {
      const identity = {};
      const option = selectedOption();
      const own = option ? option.getAttribute("data-strength") : "";
      const value = strength.value.trim();
      // The character's own strength is left to the server (it applies it where the backend
      // can); a changed one is asked for explicitly.
      if (!strength.disabled && value !== "" && Number(value) !== Number(own)) {
        identity.strength = Number(value);
      }
      if (retry.checked) {
        identity.minScore = SAME_PERSON;
        identity.maxTries = RETRY_TRIES;
      }
      if (Object.keys(identity).length) data.identity = identity;
    }
    return window.charforgeSettings ? window.charforgeSettings.extend(data) : data;
  }

  // The same-person badge, as the pages' _identity.html draws it.
  function scoreBadge(consistency) {
    if (!consistency) return null;
    const badge = document.createElement("span");
    let label;
    let title;
    if (typeof consistency.score === "number") {
      const score = consistency.score.toFixed(2);
      const same = consistency.score >= SAME_PERSON;
      label = (same ? "Same person " : "Different ") + score;
      title = "Face similarity to the reference images: " + score + "; " + SAME_PERSON +
        " or more means the same person";
      badge.className = "score score-" + (same ? "ok" : "warn");
    } else {
      const reason = String(consistency.reason || "");
      label = /no face/i.test(reason) ? "No face found" : "Not scored";
      title = sentence(reason) || "The image could not be compared with the reference images.";
      badge.className = "score score-none";
    }
    badge.title = title;
    const hidden = document.createElement("span");
    hidden.className = "sr-only";
    hidden.textContent = " (" + title + ")";
    badge.append(label, hidden);
    return badge;
  }

  function identityLine(identity) {
    if (!identity) return "";
    if (identity.applied) {
      let text = "Reference images used";
      if (typeof identity.strength === "number") text += ", strength " + identity.strength;
      return text + (identity.method ? " (" + identity.method + ")" : "");
    }
    const reason = plain(identity.reason).trim();
    return "Reference images not used" + (reason ? ": " + reason : "");
  }

  function triesLine(plan, consistency) {
    if (!plan || plan.minScore == null) return "";
    const tries = (plan.tries || []).reduce((most, t) => Math.max(most, t.try || 1), 1);
    const word = tries === 1 ? "try" : "tries";
    if (consistency && consistency.reachedMinScore) return "Same person after " + tries + " " + word;
    return "Best of " + tries + " " + word + " kept (none reached " + SAME_PERSON + ")";
  }

  function showIdentityResult(out, first) {
    const line = document.getElementById("result-identity");
    line.replaceChildren();
    const badge = scoreBadge(first.consistency);
    if (badge) line.append(badge);
    const parts = [];
    if (out.styleTransfer && out.styleTransfer.to) {
      parts.push("Style transfer: " + styleName(out.styleTransfer.from) + " → " +
        styleName(out.styleTransfer.to));
    }
    parts.push(triesLine(out.identity, first.consistency), identityLine(first.identity));
    for (const text of parts.filter(Boolean)) {
      const span = document.createElement("span");
      span.className = "muted";
      span.textContent = text;
      line.append(span);
    }
    line.hidden = !line.childNodes.length;
  }

  function styleName(style) {
    for (const option of transfer.options) {
      if (option.value === style) return option.getAttribute("data-label") || style;
    }
    return style || "?";
  }

  function seconds(job) {
    return Math.floor((Date.now() - job.started) / 1000);
  }

  // Screen readers hear the status only when it changes in a way that matters; the visible
  // line changes every step or second.
  function announce(text) {
    if (announcer.textContent !== text) announcer.textContent = text;
  }

  function render() {
    const job = current;
    if (!job || job.finished) return;
    const retry = job.attempt > 1 ? " (attempt " + job.attempt + ")" : "";
    let percent = null;
    if (job.state === "queued") {
      const text = job.position == null ? "Queued…" : "Queued — " + job.position + " ahead";
      progress.textContent = text;
      announce(text);
    } else if (job.state === "running" && (job.steps || job.progress != null)) {
      const fraction = job.progress != null ? job.progress : job.step / job.steps;
      percent = Math.max(0, Math.min(100, Math.round(fraction * 100)));
      progress.textContent = "Generating… " +
        (job.steps ? "Step " + (job.step || 0) + "/" + job.steps + " (" + percent + "%)" : percent + "%") +
        retry;
      announce("Generating, " + Math.floor(percent / 25) * 25 + "% done" + retry);
    } else {
      // Running with no progress reported (yet), or not heard from: the time it has taken.
      progress.textContent = "Generating… " + seconds(job) + " s" + retry;
      announce("Generating" + retry);
    }
    if (percent == null) bar.removeAttribute("value"); // indeterminate
    else bar.value = percent;
  }

  function update(job, out) {
    job.state = out.state;
    job.attempt = out.attempts;
    job.position = out.queuePosition;
    job.progress = out.progress;
    job.step = out.step;
    job.steps = out.steps;
  }

  function showResult(out) {
    const images = out.images || [];
    const first = images[0];
    if (!first) return false;
    const simulated = simulatedBackends.indexOf(out.backend) >= 0;
    const image = document.getElementById("result-image");
    image.src = "/images/" + first.id + "/file";
    image.alt = "Generated image, seed " + first.seed;
    document.getElementById("result-caption").textContent =
      "Seed " + first.seed + " · " + first.width + "×" + first.height + " · " + out.model +
      (simulated ? " · simulated placeholder" : "");
    showIdentityResult(out, first);
    document.getElementById("result-page").href = "/images/" + first.id;
    document.getElementById("result-history").href = "/characters/" + out.characterId + "/images";
    heading.textContent = images.length > 1 ? "Results (" + images.length + " images)" : "Result";
    more.replaceChildren();
    for (const other of images.slice(1)) {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = "/images/" + other.id;
      const thumb = document.createElement("img");
      thumb.src = "/images/" + other.id + "/thumb";
      thumb.alt = "Generated image, seed " + other.seed;
      thumb.loading = "lazy";
      const caption = document.createElement("span");
      caption.className = "muted";
      caption.textContent = "Seed " + other.seed;
      link.append(thumb, caption);
      const badge = scoreBadge(other.consistency);
      if (badge) link.append(badge);
      item.append(link);
      more.append(item);
    }
    more.hidden = images.length < 2;
    result.hidden = false;
    const empty = document.getElementById("result-empty");
    if (empty) empty.hidden = true;
    return true;
  }

  // Where focus goes at the end: only moved when it was on the (hidden or disabled) buttons
  // or nowhere, so nobody typing the next prompt is pulled away.
  function settleFocus(target) {
    const active = document.activeElement;
    if (!active || active === document.body || active === button || active === cancelButton) {
      target.focus();
      return true;
    }
    return false;
  }

  function stopFollowing(job) {
    job.finished = true;
    clearInterval(job.timer);
    clearTimeout(job.poll);
    if (job.source) job.source.close();
    cancelButton.hidden = true;
    cancelButton.disabled = false;
    cancelButton.textContent = "Cancel";
    bar.hidden = true;
    button.disabled = false;
  }

  function finish(job, out) {
    if (job.finished) return;
    const took = Math.round((Date.now() - job.started) / 1000);
    stopFollowing(job);
    if (out.state === "succeeded" && showResult(out)) {
      progress.textContent = "Done in " + took + " s";
      announce(progress.textContent);
      // The result in view (its heading at the top), unless they are busy with the form;
      // again once the image has loaded, as the page was too short to scroll that far before.
      if (settleFocus(heading)) {
        result.scrollIntoView({ block: "start" });
        const image = document.getElementById("result-image");
        const scroll = () => {
          if (document.activeElement === heading) result.scrollIntoView({ block: "start" });
        };
        if (image.complete) scroll();
        else image.addEventListener("load", scroll, { once: true });
      }
      return;
    }
    if (out.state === "cancelled") {
      progress.textContent = "Cancelled";
      announce("Cancelled");
    } else {
      progress.textContent = "";
      announce("");
      showError(out.error || { message: "The generation " + out.state + " without an image." });
    }
    settleFocus(button);
  }

  function giveUp(job, error) {
    if (job.finished) return;
    stopFollowing(job);
    progress.textContent = "";
    announce("");
    showError(error);
    settleFocus(button);
  }

  // The stream is the fast path; this is the fallback when it fails (a proxy that buffers,
  // a dropped connection): GET the job every second until it is final.
  function poll(job) {
    if (job.finished) return;
    fetch("/generate-images/jobs/" + encodeURIComponent(job.id), {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
      cache: "no-store",
    }).then(async (response) => {
      const payload = await response.json().catch(() => null);
      if (job.finished) return;
      if (response.ok && payload) {
        job.failures = 0;
        update(job, payload);
        if (FINAL.indexOf(payload.state) >= 0) return finish(job, payload);
        render();
      } else if (response.status < 500 && payload && payload.error) {
        return giveUp(job, payload.error); // gone, signed out: polling again will not help
      } else {
        job.failures += 1;
      }
      schedulePoll(job);
    }).catch(() => {
      job.failures += 1;
      schedulePoll(job);
    });
  }

  function schedulePoll(job) {
    if (job.finished) return;
    if (job.failures >= POLL_GIVE_UP) {
      return giveUp(job, { message: "Lost contact with charforge",
        hint: "The image will still appear in the character's history when it is done." });
    }
    job.poll = setTimeout(() => poll(job), POLL_MS);
  }

  function follow(job) {
    if (!window.EventSource) return poll(job);
    const source = new EventSource("/generate-images/jobs/" + encodeURIComponent(job.id) + "/events");
    job.source = source;
    const on = (name, handle) => source.addEventListener(name, (event) => {
      if (job.finished) return;
      let data;
      try { data = JSON.parse(event.data); } catch (err) { return; }
      handle(data);
    });
    on("state", (data) => {
      job.state = data.state;
      job.attempt = data.attempt;
      if (data.state !== "queued") job.position = null;
      render();
    });
    on("queue", (data) => { job.position = data.position; render(); });
    on("progress", (data) => {
      job.progress = data.progress;
      job.step = data.step;
      job.steps = data.steps;
      render();
    });
    on("done", (data) => { source.close(); finish(job, data); });
    source.onerror = () => {
      if (job.finished) return;
      // EventSource would reconnect by itself, but not after a 401/404; polling tells which.
      source.close();
      job.source = null;
      poll(job);
    };
  }

  cancelButton.addEventListener("click", async () => {
    const job = current;
    if (!job || job.finished) return;
    cancelButton.disabled = true;
    cancelButton.textContent = "Cancelling…";
    try {
      const response = await fetch("/generate-images/jobs/" + encodeURIComponent(job.id) + "/cancel", {
        method: "POST",
        headers: { Accept: "application/json", "X-CSRF-Token": form.dataset.csrf },
        credentials: "same-origin",
      });
      const payload = await response.json().catch(() => null);
      if (job.finished) return;
      if (response.ok && payload && FINAL.indexOf(payload.state) >= 0) return finish(job, payload);
      if (response.status === 409) return; // it ended meanwhile: the stream brings the outcome
      showError((payload && payload.error) || { message: "The server answered " + response.status + "." });
    } catch (err) {
      if (job.finished) return;
      showError({ message: "Could not reach charforge: " + err.message });
    }
    cancelButton.disabled = false;
    cancelButton.textContent = "Cancel";
    cancelButton.focus();
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (current && !current.finished) return; // one generation at a time from this page
    clearErrors();
    result.hidden = true;
    button.disabled = true;
    progress.textContent = "Submitting…";
    announce("Submitting");
    const started = Date.now();
    let response;
    let payload;
    try {
      response = await fetch("/generate-images/jobs", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json",
          "X-CSRF-Token": form.dataset.csrf },
        body: JSON.stringify(body()),
        credentials: "same-origin",
      });
      payload = await response.json().catch(() => null);
    } catch (err) {
      response = null;
      payload = { error: { message: "Could not reach charforge: " + err.message } };
    }
    if (!response || !response.ok || !payload || !payload.id) {
      progress.textContent = "";
      announce("");
      showError((payload && payload.error) ||
        { message: "The server answered " + (response ? response.status : "nothing") + "." });
      button.disabled = false;
      button.focus(); // back on the button to retry
      return;
    }
    const job = { id: payload.id, started: started, finished: false, failures: 0,
      source: null, poll: null, timer: null };
    update(job, payload);
    current = job;
    cancelButton.hidden = false;
    bar.hidden = false;
    if (FINAL.indexOf(payload.state) >= 0) return finish(job, payload);
    render();
    job.timer = setInterval(render, 1000);
    follow(job);
  });
})();
