/* MathJax 2 configuration for the offline docs: the MathJax files come from the jupyter-server-mathjax
   package (copied to assets/mathjax/ by tools/build_docs.py). Math is typeset as JupyterLab shows it:
   $...$ and \(...\) inline, $$...$$ and \[...\] displayed, with the STIX web font that package ships. */
window.MathJax = {
  config: ["TeX-AMS-MML_HTMLorMML-full.js", "Safe.js"],
  tex2jax: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  "HTML-CSS": {availableFonts: [], imageFont: null, preferredFont: null, webFont: "STIX-Web",
               linebreaks: {automatic: true}},
  menuSettings: {renderer: "HTML-CSS"},
  messageStyle: "none",
};
