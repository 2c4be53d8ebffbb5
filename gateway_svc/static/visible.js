// Timers that run only while the page is visible: a hidden tab neither polls the gateway nor redraws.
// When the page shows again the work runs at once (the view catches up), then on its interval.

// Call fn every `ms` while the document is visible. Returns stop(), which also forgets the listener.
export function everyWhileVisible(fn, ms, doc = document) {
  let timer = 0;
  const start = () => { if (!timer) timer = setInterval(fn, ms); };
  const halt = () => { clearInterval(timer); timer = 0; };
  const onChange = () => {
    if (doc.hidden) halt();
    else { fn(); start(); }
  };
  doc.addEventListener("visibilitychange", onChange);
  if (!doc.hidden) start();
  return () => {
    halt();
    doc.removeEventListener("visibilitychange", onChange);
  };
}
