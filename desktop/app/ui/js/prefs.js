// Preferences that live only on this computer (theme, notifications, privacy switches).

const KEY = "obmin.prefs";
const DEFAULTS = { theme: "system", notify: true, notifyPreview: true, readReceipts: true, typing: true };

export function loadPrefs() {
  try {
    return { ...DEFAULTS, ...JSON.parse(localStorage.getItem(KEY) ?? "{}") };
  } catch {
    return { ...DEFAULTS };
  }
}

export function savePrefs(prefs) {
  localStorage.setItem(KEY, JSON.stringify(prefs));
}

const systemDark = window.matchMedia("(prefers-color-scheme: dark)");

/** Applies light/dark/system to <html data-theme>, following system changes when "system". */
export function applyTheme(choice) {
  const dark = choice === "dark" || (choice === "system" && systemDark.matches);
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  document.documentElement.dataset.themeChoice = choice;
}

systemDark.addEventListener("change", () => {
  if (document.documentElement.dataset.themeChoice === "system") applyTheme("system");
});
