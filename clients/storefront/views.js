// Small helpers the pages share: building elements (text only, never HTML from data), and
// what the browser keeps between visits (the signed-in person, the cart) in localStorage.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

// A message for the person: role=alert for refusals, role=status for news.
export function notice(text, kind = "error") {
  return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

const SESSION = "marketplace.session";
const CART = "marketplace.cart";

export const session = {
  get: () => load(SESSION, null),
  set: (value) => localStorage.setItem(SESSION, JSON.stringify(value)),
  clear: () => localStorage.removeItem(SESSION),
  token: () => load(SESSION, null)?.token ?? "",
  isAdmin: () => (load(SESSION, null)?.roles ?? []).includes("admin"),
};

// The cart: its lines, and the request id of the order they become. The id is made once,
// when the customer first places the order, and kept (across reloads) until the order is
// made or the lines change, so a retry after a lost answer cannot order twice.
export const cart = {
  get: () => load(CART, { lines: [], requestId: null }),
  save: (value) => localStorage.setItem(CART, JSON.stringify(value)),
  add(product, quantity) {
    const value = cart.get();
    const line = value.lines.find((l) => l.productId === product.id);
    if (line) line.quantity += quantity;
    else
      value.lines.push({
        productId: product.id,
        sku: product.sku,
        name: product.name,
        price: product.price,
        quantity,
      });
    cart.save({ lines: value.lines, requestId: null });
  },
  setQuantity(productId, quantity) {
    const value = cart.get();
    const lines = value.lines
      .map((l) => (l.productId === productId ? { ...l, quantity } : l))
      .filter((l) => l.quantity > 0);
    cart.save({ lines, requestId: null });
  },
  requestId() {
    const value = cart.get();
    if (!value.requestId) {
      value.requestId = crypto.randomUUID();
      cart.save(value);
    }
    return value.requestId;
  },
  clear: () => cart.save({ lines: [], requestId: null }),
  count: () => cart.get().lines.reduce((sum, l) => sum + l.quantity, 0),
};
