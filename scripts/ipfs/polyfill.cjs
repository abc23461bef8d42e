// js-ipfs 0.66 calls Promise.withResolvers, which Node 20 lacks (loaded with NODE_OPTIONS=--require).
if (!Promise.withResolvers) {
  Promise.withResolvers = function () {
    let resolve, reject;
    const promise = new Promise((a, b) => { resolve = a; reject = b; });
    return { promise, resolve, reject };
  };
}
