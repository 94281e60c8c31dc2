() => {
  // zimage studio, the browser side: the language and light/dark switches (remembered in
  // localStorage), the question before deleting an image, and on a phone, the result scrolled
  // into view after Generate. Gradio runs this once when the page has loaded.
  const LANG = "zimage-lang";
  const THEME = "zimage-theme";
  const WORDS = {
    en: { confirmDelete: "Delete this image for good?" },
    "zh-CN": { confirmDelete: "确定永久删除这张图片吗？" },
  };
  const current = () => ((document.documentElement.lang || "en").toLowerCase().startsWith("zh") ? "zh-CN" : "en");

  // Gradio translates its page with svelte-i18n; its `changeLocale` lives in the core module the
  // page has already loaded, and importing the same URL again gives that same module.
  async function setLocale(lang) {
    const url = performance
      .getEntriesByType("resource")
      .map((e) => e.name)
      .find((n) => /\/assets\/core-[^/]+\.js(\?|$)/.test(n));
    if (!url) return false;
    try {
      const core = await import(url);
      if (typeof core.changeLocale !== "function") return false;
      core.changeLocale(lang);
      return true;
    } catch (e) {
      console.warn("zimage: cannot switch the language", e);
      return false;
    }
  }
  function remember(lang) {
    localStorage.setItem(LANG, lang);
    document.cookie = `${LANG}=${lang}; path=/; max-age=31536000; SameSite=Lax`;
  }
  window.ziSwitchLang = async () => {
    const next = current() === "zh-CN" ? "en" : "zh-CN";
    remember(next);
    await setLocale(next);
  };
  const stored = localStorage.getItem(LANG);
  if (stored) {
    remember(stored);
    if (stored !== current()) setLocale(stored);
  }

  function applyTheme(mode) {
    document.body.classList.toggle("dark", mode === "dark");
  }
  window.ziToggleTheme = () => {
    const mode = document.body.classList.contains("dark") ? "light" : "dark";
    localStorage.setItem(THEME, mode);
    applyTheme(mode);
  };
  const theme = localStorage.getItem(THEME);
  if (theme) applyTheme(theme);

  window.ziConfirmDelete = () => window.confirm(WORDS[current()].confirmDelete);

  // On a narrow screen the result sits below the form: bring it into view when a run starts.
  function showResult() {
    if (window.innerWidth > 900) return;
    setTimeout(() => {
      const box = document.querySelector("#zi-output");
      if (box) box.scrollIntoView({ behavior: "smooth", block: "start" });
    }, 150);
  }
  document.addEventListener("click", (e) => {
    if (e.target.closest("#zi-lang")) window.ziSwitchLang();
    else if (e.target.closest("#zi-theme")) window.ziToggleTheme();
    else if (e.target.closest("#zi-generate")) showResult();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && e.target.closest && e.target.closest("#zi-prompt")) showResult();
  });
}
