// The Generate Images page: indicator updates, generation with elapsed time, inline errors.
(function () {
  "use strict";
  const form = document.getElementById("generate-form");
  if (!form) return;
  const select = document.getElementById("characterId");
  const indicator = document.getElementById("indicator-text");
  const note = document.getElementById("indicator-note");
  const button = document.getElementById("generate-button");
  const progress = document.getElementById("progress");
  const errorBox = document.getElementById("form-error");
  const result = document.getElementById("result");

  function showIndicator() {
    const option = select.options[select.selectedIndex];
    const text = option ? option.getAttribute("data-indicator") : "";
    indicator.textContent = text || "";
    note.hidden = !text;
  }
  select.addEventListener("change", showIndicator);
  select.addEventListener("input", showIndicator);

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
    for (const name of ["width", "height", "steps", "cfgScale", "seed"]) {
      const value = form[name].value.trim();
      if (value !== "") data[name] = Number(value);
    }
    return data;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    button.disabled = true;
    const started = Date.now();
    const tick = () => { progress.textContent = "Generating… " + Math.floor((Date.now() - started) / 1000) + " s"; };
    tick();
    const timer = setInterval(tick, 1000);
    try {
      const response = await fetch("/generate-images/run", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": form.dataset.csrf },
        body: JSON.stringify(body()),
        credentials: "same-origin",
      });
      const payload = await response.json().catch(() => null);
      if (response.status === 200 && payload) {
        const image = payload.images[0];
        document.getElementById("result-image").src = "/images/" + image.id + "/file";
        document.getElementById("result-image").alt = "Generated image, seed " + image.seed;
        document.getElementById("result-caption").textContent =
          "Seed " + image.seed + " · " + image.width + "×" + image.height + " · " + payload.model +
          (payload.simulated ? " · simulated placeholder" : "");
        document.getElementById("result-page").href = "/images/" + image.id;
        document.getElementById("result-history").href = "/characters/" + payload.characterId + "/images";
        result.hidden = false;
        // The disabled button lost focus; put it where the news is.
        document.getElementById("result-heading").focus();
        progress.textContent = "Done in " + Math.round((Date.now() - started) / 1000) + " s";
      } else if (response.status === 202) {
        progress.textContent = "Still running; the image will appear in the character's history.";
      } else {
        progress.textContent = "";
        showError((payload && payload.error) || { message: "The server answered " + response.status + "." });
      }
    } catch (err) {
      progress.textContent = "";
      showError({ message: "Could not reach charforge: " + err.message });
    } finally {
      clearInterval(timer);
      button.disabled = false;
      if (result.hidden) button.focus();  // after an error, back on the button to retry
    }
  });
})();
