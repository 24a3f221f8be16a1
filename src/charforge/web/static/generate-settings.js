// The Generate page's prompt templates, advanced lists and presets (generate.js sends the
// form; this adds to what it sends through window.charforgeSettings).
// - A template shows one input per named slot and writes the prompt from them (a preview:
//   the server expands the template itself); its own settings fill the advanced settings.
// - Sampler, scheduler and upscaler lists are read from the character's backends.
// - The advanced settings can be saved as a preset and a preset applied.
(function () {
  "use strict";
  const form = document.getElementById("generate-form");
  if (!form) return;
  const character = document.getElementById("characterId");
  const picker = document.getElementById("templateId");
  const slotsBox = document.getElementById("template-slots");
  const prompt = document.getElementById("prompt");
  const promptNote = document.getElementById("prompt-note");
  const source = document.getElementById("options-source");
  const presetSelect = document.getElementById("preset");
  const presetName = document.getElementById("presetName");
  const presetStatus = document.getElementById("preset-status");
  // The settings a preset holds and a template may set, by the generate body's names (each
  // is also its input's id).
  const SETTINGS = ["width", "height", "steps", "cfgScale", "sampler", "scheduler", "hires",
    "hiresScale", "hiresSteps", "denoisingStrength", "hiresUpscaler", "clipSkip"];
  const NUMBERS = ["width", "height", "steps", "cfgScale", "hiresScale", "hiresSteps",
    "denoisingStrength", "clipSkip"];
  const typed = {}; // what was typed into each slot, kept across templates
  let optionsFor = null; // the character whose lists are shown

  function chosenTemplate() {
    const option = picker.options[picker.selectedIndex];
    return option && option.value ? option : null;
  }

  function label(slot) {
    const words = slot.replace(/_/g, " ");
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  // The template's text with its slots filled ({{ and }} are literal braces); an empty slot
  // stays visible as {name}, so it is clear what is still missing.
  function preview(text, values) {
    return text.replace(/\{\{|\}\}|\{([a-z][a-z0-9_]{0,31})\}/g, (match, slot) => {
      if (!slot) return match.charAt(0);
      const value = (values[slot] || "").trim();
      return value || "{" + slot + "}";
    });
  }

  function slotValues() {
    const values = {};
    slotsBox.querySelectorAll("input[data-slot]").forEach((input) => {
      values[input.dataset.slot] = input.value;
    });
    return values;
  }

  function showPreview() {
    const template = chosenTemplate();
    if (!template) return;
    const who = character.options[character.selectedIndex];
    const values = Object.assign(slotValues(), {
      character: who ? who.textContent.trim() : "",
      appearance: who ? who.getAttribute("data-appearance") || "" : "",
    });
    prompt.value = preview(template.getAttribute("data-prompt") || "", values);
  }

  function showSlots(template) {
    slotsBox.replaceChildren();
    const slots = (template.getAttribute("data-slots") || "").split(" ").filter(Boolean);
    for (const slot of slots) {
      const field = document.createElement("label");
      field.htmlFor = "var-" + slot;
      field.textContent = label(slot);
      const input = document.createElement("input");
      input.id = "var-" + slot;
      input.dataset.slot = slot;
      input.maxLength = 2000;
      input.required = true;
      input.autocomplete = "off";
      input.value = typed[slot] || "";
      input.addEventListener("input", () => {
        typed[slot] = input.value;
        input.removeAttribute("aria-invalid");
        showPreview();
      });
      field.append(input);
      slotsBox.append(field);
    }
    slotsBox.hidden = !slots.length;
  }

  function setSetting(name, value) {
    const input = document.getElementById(name);
    if (!input || value === undefined || value === null) return;
    if (input.type === "checkbox") {
      if (input.disabled) return; // the route cannot: generate.js keeps it off
      input.checked = Boolean(value);
      input.dispatchEvent(new Event("change"));
      return;
    }
    if (input.tagName === "SELECT") offer(input, String(value));
    input.value = String(value);
  }

  function applySettings(settings) {
    for (const name of SETTINGS) if (name in settings) setSetting(name, settings[name]);
  }

  function chooseTemplate() {
    const template = chosenTemplate();
    // An error shown may be about the blanks of the template left: the next Generate says.
    document.getElementById("form-error").hidden = true;
    picker.removeAttribute("aria-invalid");
    prompt.readOnly = Boolean(template);
    promptNote.hidden = !template;
    if (!template) {
      slotsBox.replaceChildren();
      slotsBox.hidden = true;
      return; // the text stays, to be edited freely
    }
    showSlots(template);
    try {
      applySettings(JSON.parse(template.getAttribute("data-params") || "{}"));
    } catch (err) { /* a template without settings */ }
    showPreview();
  }
  picker.addEventListener("change", chooseTemplate);
  character.addEventListener("change", showPreview);

  // -- lists from the character's backends -------------------------------------------------

  // ``select`` offers ``names``; the current choice stays (first) when the list lacks it.
  function fill(select, names) {
    const current = select.value;
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    offer(select, current);
    select.value = matching(select, current) || current;
  }

  function matching(select, value) {
    const lowered = String(value || "").toLowerCase();
    for (const option of select.options) {
      if (option.value.toLowerCase() === lowered) return option.value;
    }
    return null;
  }

  function offer(select, value) {
    if (!value || matching(select, value)) return;
    select.prepend(new Option(value, value));
  }

  async function loadOptions() {
    const id = character.value;
    if (!id || id === optionsFor) return;
    optionsFor = id;
    try {
      const response = await fetch("/generate-images/characters/" + encodeURIComponent(id) +
        "/options", { headers: { Accept: "application/json" }, credentials: "same-origin" });
      const options = await response.json();
      if (!response.ok || optionsFor !== id) return;
      fill(document.getElementById("sampler"), options.samplers);
      fill(document.getElementById("scheduler"), options.schedulers);
      fill(document.getElementById("hiresUpscaler"), options.upscalers);
      source.textContent = options.source === "backend"
        ? "Samplers, schedulers and upscalers as the " + options.style +
          " style's WebUI lists them."
        : "The " + options.style + " style's WebUI did not answer: these are the usual " +
          "AUTOMATIC1111 names.";
    } catch (err) {
      optionsFor = null; // try again on the next change
    }
  }
  character.addEventListener("change", loadOptions);
  loadOptions();

  // -- presets -----------------------------------------------------------------------------

  function currentSettings() {
    const settings = {};
    for (const name of SETTINGS) {
      const input = document.getElementById(name);
      if (!input) continue;
      if (input.type === "checkbox") {
        settings[name] = input.checked;
      } else if (input.value.trim() !== "") {
        settings[name] = NUMBERS.indexOf(name) >= 0 ? Number(input.value) : input.value.trim();
      }
    }
    return settings;
  }

  function say(text, failed) {
    presetStatus.textContent = text;
    presetStatus.classList.toggle("error", Boolean(failed));
  }

  document.getElementById("apply-preset").addEventListener("click", () => {
    const option = presetSelect.options[presetSelect.selectedIndex];
    if (!option || !option.value) {
      say("Choose a saved preset first.", true);
      presetSelect.focus();
      return;
    }
    applySettings(JSON.parse(option.getAttribute("data-params") || "{}"));
    say("Applied “" + option.textContent + "”.");
  });

  document.getElementById("save-preset").addEventListener("click", async () => {
    const name = presetName.value.trim();
    presetName.removeAttribute("aria-invalid");
    if (!name) {
      presetName.setAttribute("aria-invalid", "true");
      say("Give the preset a name.", true);
      presetName.focus();
      return;
    }
    let response;
    let payload = null;
    try {
      response = await fetch("/generate-images/presets", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json",
          "X-CSRF-Token": form.dataset.csrf },
        body: JSON.stringify({ name: name, params: currentSettings() }),
        credentials: "same-origin",
      });
      payload = await response.json().catch(() => null);
    } catch (err) {
      say("Could not reach charforge: " + err.message, true);
      return;
    }
    if (!response.ok || !payload || !payload.id) {
      const error = (payload && payload.error) || { message: "The server answered " + response.status + "." };
      if (error.field === "name") presetName.setAttribute("aria-invalid", "true");
      say(error.message + (error.hint ? " " + error.hint : ""), true);
      return;
    }
    const option = new Option(payload.name, payload.id, true, true);
    option.setAttribute("data-params", JSON.stringify(payload.params));
    presetSelect.append(option);
    presetName.value = "";
    say("Saved “" + payload.name + "”.");
  });

  // -- what generate.js sends ----------------------------------------------------------------

  window.charforgeSettings = {
    // The advanced fields beyond generate.js's own, and the template instead of the prompt.
    extend(data) {
      for (const name of ["hiresScale", "hiresSteps", "denoisingStrength", "clipSkip"]) {
        const value = document.getElementById(name).value.trim();
        if (value !== "") data[name] = Number(value);
      }
      data.hiresUpscaler = document.getElementById("hiresUpscaler").value;
      const template = chosenTemplate();
      if (template) {
        delete data.prompt;
        data.templateId = template.value;
        data.variables = slotValues();
      }
      return data;
    },
    // Where an error about a template's field is shown.
    fieldFor(name) {
      if (/^variables\./.test(name)) {
        return document.getElementById("var-" + name.slice("variables.".length)) || picker;
      }
      return name === "templateId" ? picker : null;
    },
  };
})();
