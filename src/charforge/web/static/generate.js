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

  function showIndicator() {
    const option = select.options[select.selectedIndex];
    const text = option ? option.getAttribute("data-indicator") : "";
    indicator.textContent = text || "";
    note.hidden = !text;
    // A route whose backends have no second pass would refuse hires=true (422): offer only
    // what the character's backends can do.
    const canHires = !option || option.getAttribute("data-hires") !== "0";
    hires.disabled = !canHires;
    hires.checked = canHires && hiresWanted;
    hiresNote.hidden = canHires;
  }
  select.addEventListener("change", showIndicator);
  select.addEventListener("input", showIndicator);
  showIndicator();

  function clearErrors() {
    errorBox.hidden = true;
    errorBox.textContent = "";
    form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  }

  function showError(error) {
    const joiner = /[.!?]$/.test(error.message) ? " " : ". ";
    errorBox.textContent = error.message + (error.hint ? joiner + error.hint : "");
    errorBox.hidden = false;
    const field = error.field && document.getElementById(error.field.split(".")[0]);
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
    return data;
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
      item.append(link);
      more.append(item);
    }
    more.hidden = images.length < 2;
    result.hidden = false;
    return true;
  }

  // Where focus goes at the end: only moved when it was on the (hidden or disabled) buttons
  // or nowhere, so nobody typing the next prompt is pulled away.
  function settleFocus(target) {
    const active = document.activeElement;
    if (!active || active === document.body || active === button || active === cancelButton) {
      target.focus();
    }
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
      settleFocus(heading);
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
