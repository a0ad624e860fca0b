// Aladin Lite 3.8 leaves its catalog layer blank when its div changes size under it (a div sized by CSS alone does,
// while the page lays out), until the view moves. So each view's div gets its size in pixels from the box it sits
// in when the view is made, and when that box changes size, its new size and then a nudge of the view.
const sized = [];
let resizing;

function fitInto(div, box) {
  const rect = box.getBoundingClientRect();
  div.style.width = Math.floor(rect.width) + "px";
  div.style.height = Math.floor(rect.height) + "px";
}

function refit() {
  for (const [, div, box] of sized) fitInto(div, box);
  setTimeout(() => {
    for (const [aladin] of sized) {
      const fov = aladin.getFov()[0];
      aladin.setFoV(fov * 0.999);
      aladin.setFoV(fov);
    }
  }, 1000);
}

const watcher = new ResizeObserver(() => { clearTimeout(resizing); resizing = setTimeout(refit, 300); });

function keepSized(aladin, div, box) {
  sized.push([aladin, div, box]);
  watcher.observe(box);
}
