// The storefront: one page, its views chosen by the URL's fragment (#/, #/product/ID,
// #/cart, #/orders, #/orders/ID, #/signin, #/admin). Plain DOM, no framework, no build.
import { ApiError, api, describe, money, statusName, toMoney } from "./api.js";
import { cart, h, notice, session } from "./views.js";

const view = document.getElementById("view");
const PAGE_SIZE = 10;
const REFRESH_MS = 2000;
let leaving = []; // what the current view stops when another replaces it (timers)
let config = { devSignIn: false };
let stripe = null; // Stripe.js, loaded from the provider's origin (localstripe's under make run)

const orderStatus = (s) => statusName(s, "ORDER_STATUS_");
const paymentStatus = (s) => statusName(s, "PAYMENT_STATUS_");
const productLink = (p) => h("a", { href: `#/product/${encodeURIComponent(p.id)}` }, p.name);

let generation = 0; // which route's view is current

function show(...children) {
  view.replaceChildren(...children);
}

// A show() for a view that renders after waiting: it does nothing once the person has
// moved on, so a slow answer never replaces the view they went to.
function showing() {
  const mine = generation;
  return (...children) => {
    if (mine === generation) show(...children);
  };
}

function every(ms, task) {
  const timer = setInterval(task, ms);
  leaving.push(() => clearInterval(timer));
}

function requireSignIn(what) {
  if (session.token()) return true;
  show(
    h("h1", {}, what),
    notice("Sign in first.", "info"),
    h("a", { href: "#/signin", class: "button" }, "Sign in"),
  );
  return false;
}

// --- header -------------------------------------------------------------------------------

function renderHeader() {
  const who = session.get();
  const links = [
    h("a", { href: "#/" }, "Catalog"),
    h("a", { href: "#/cart", id: "cart-link" }, `Cart (${cart.count()})`),
    h("a", { href: "#/orders" }, "Orders"),
    session.isAdmin() ? h("a", { href: "#/admin" }, "Admin") : null,
  ];
  const account = who
    ? [
        h("span", { id: "who" }, `Signed in as ${who.subject}${session.isAdmin() ? " (admin)" : ""}`),
        h("button", { type: "button", class: "link", onclick: signOut }, "Sign out"),
      ]
    : [h("a", { href: "#/signin" }, "Sign in")];
  document.getElementById("nav").replaceChildren(...links.filter(Boolean));
  document.getElementById("account").replaceChildren(...account);
}

function signOut() {
  session.clear();
  renderHeader();
  location.hash = "#/";
}

// --- catalog ------------------------------------------------------------------------------

async function catalogPage(params) {
  const show = showing();
  const pageToken = params.get("page") ?? "";
  show(h("h1", {}, "Catalog"), h("p", { class: "muted" }, "Loading…"));
  let answer;
  try {
    answer = await api.listProducts(pageToken, PAGE_SIZE);
  } catch (error) {
    show(h("h1", {}, "Catalog"), notice(describe(error)));
    return;
  }
  const rows = (answer.products ?? []).map((p) =>
    h(
      "tr",
      { dataset: { sku: p.sku } },
      h("td", {}, productLink(p)),
      h("td", { class: "sku" }, p.sku),
      h("td", { class: "price" }, money(p.price)),
      h("td", { class: "stock" }, Number(p.stock) > 0 ? `${p.stock} in stock` : "sold out"),
      h(
        "td",
        {},
        h(
          "button",
          {
            type: "button",
            disabled: Number(p.stock) <= 0,
            onclick: () => addToCart(p, 1),
          },
          "Add to cart",
        ),
      ),
    ),
  );
  const paging = h(
    "nav",
    { class: "paging" },
    pageToken ? h("button", { type: "button", onclick: () => history.back() }, "Previous page") : null,
    answer.nextPageToken
      ? h("a", { class: "button", href: `#/?page=${encodeURIComponent(answer.nextPageToken)}` }, "Next page")
      : null,
  );
  show(
    h("h1", {}, "Catalog"),
    h("div", { id: "added", "aria-live": "polite" }),
    rows.length
      ? h(
          "table",
          { class: "products" },
          h("thead", {}, h("tr", {}, ["Product", "SKU", "Price", "Stock", ""].map((t) => h("th", {}, t)))),
          h("tbody", {}, rows),
        )
      : h("p", {}, "No products here."),
    paging,
  );
}

function addToCart(product, quantity) {
  cart.add(product, quantity);
  renderHeader();
  document.getElementById("added")?.replaceChildren(notice(`Added ${product.name} to the cart.`, "info"));
}

async function productPage(id) {
  const show = showing();
  let product;
  try {
    ({ product } = await api.getProduct(id));
  } catch (error) {
    show(h("h1", {}, "Product"), notice(describe(error)));
    return;
  }
  const quantity = h("input", { type: "number", min: 1, value: 1, id: "quantity", name: "quantity" });
  show(
    h("p", {}, h("a", { href: "#/" }, "← Catalog")),
    h("h1", {}, product.name),
    h("p", { class: "sku" }, `SKU ${product.sku}`),
    h("p", { class: "description" }, product.description || ""),
    h("p", { class: "price" }, money(product.price)),
    h("p", { class: "stock" }, Number(product.stock) > 0 ? `${product.stock} in stock` : "sold out"),
    h("div", { id: "added", "aria-live": "polite" }),
    Number(product.stock) > 0 ? "" : h("p", { class: "muted" }, "Sold out: nothing to add."),
    h(
      "form",
      {
        class: "inline",
        onsubmit: (event) => {
          event.preventDefault();
          addToCart(product, Math.max(1, Number(quantity.value) || 1));
        },
      },
      h("label", { for: "quantity" }, "Quantity "),
      quantity,
      h("button", { type: "submit", disabled: Number(product.stock) <= 0 }, "Add to cart"),
    ),
  );
}

// --- cart and ordering --------------------------------------------------------------------

function cartPage() {
  const { lines } = cart.get();
  const message = h("div", { id: "order-message", "aria-live": "polite" });
  if (!lines.length) {
    show(h("h1", {}, "Cart"), h("p", {}, "The cart is empty. "), h("a", { href: "#/" }, "Browse the catalog"));
    return;
  }
  const rows = lines.map((line) =>
    h(
      "tr",
      { dataset: { sku: line.sku } },
      h("td", {}, line.name),
      h("td", { class: "price" }, money(line.price)),
      h(
        "td",
        {},
        h("input", {
          type: "number",
          min: 0,
          value: line.quantity,
          "aria-label": `Quantity of ${line.name}`,
          onchange: (event) => {
            cart.setQuantity(line.productId, Math.max(0, Number(event.target.value) || 0));
            renderHeader();
            cartPage();
          },
        }),
      ),
      h(
        "td",
        {},
        h(
          "button",
          {
            type: "button",
            class: "link",
            onclick: () => {
              cart.setQuantity(line.productId, 0);
              renderHeader();
              cartPage();
            },
          },
          "Remove",
        ),
      ),
    ),
  );
  const place = h("button", { type: "button", id: "place-order", onclick: () => placeOrder(place, message) }, "Place order");
  show(
    h("h1", {}, "Cart"),
    h(
      "table",
      { class: "cart" },
      h("thead", {}, h("tr", {}, ["Product", "Price", "Quantity", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows),
    ),
    message,
    place,
  );
}

async function placeOrder(button, message) {
  if (!session.token()) {
    message.replaceChildren(notice("Sign in to place the order.", "info"), h("a", { href: "#/signin" }, "Sign in"));
    return;
  }
  const { lines } = cart.get();
  // The same id on every retry of these lines: the server makes the order once.
  const requestId = cart.requestId();
  button.disabled = true;
  message.replaceChildren(notice("Placing the order…", "info"));
  try {
    const { order } = await api.createOrder(
      session.token(),
      requestId,
      lines.map((l) => ({ productId: l.productId, quantity: l.quantity })),
    );
    cart.clear();
    renderHeader();
    location.hash = `#/orders/${encodeURIComponent(order.id)}`;
  } catch (error) {
    button.disabled = false;
    message.replaceChildren(orderRefusal(error, lines));
  }
}

// Out of stock names each short line and what is left (the PreconditionFailure's
// violations: subject products/ID, "requested N, available M").
function orderRefusal(error, lines) {
  if (!(error instanceof ApiError) || error.reason !== "OUT_OF_STOCK") return notice(describe(error));
  const byId = new Map(lines.map((l) => [l.productId, l]));
  const items = error.violations.map((v) => {
    const id = String(v.subject ?? "").replace(/^products\//, "");
    const name = byId.get(id)?.name ?? id;
    const available = /available (\d+)/.exec(v.description ?? "")?.[1];
    const left = available === undefined ? "" : available === "0" ? " (sold out)" : ` (only ${available} left)`;
    return h("li", { dataset: { productId: id } }, `${name}: ${v.description}${left}`);
  });
  return h(
    "div",
    { class: "notice error", role: "alert" },
    h("p", {}, `${error.message}. Change the quantities and place the order again.`),
    h("ul", { class: "shortages" }, items),
  );
}

// --- orders -------------------------------------------------------------------------------

async function ordersPage(params) {
  if (!requireSignIn("Orders")) return;
  const pageToken = params.get("page") ?? "";
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  show(h("h1", {}, "Orders"), body);
  const refresh = async () => {
    try {
      const { orders = [], nextPageToken } = await api.listOrders(session.token(), pageToken);
      body.replaceChildren(
        orders.length
          ? h(
              "table",
              { class: "orders" },
              h("thead", {}, h("tr", {}, ["Order", "Placed", "Items", "Total", "Status"].map((t) => h("th", {}, t)))),
              h(
                "tbody",
                {},
                orders.map((o) =>
                  h(
                    "tr",
                    { dataset: { orderId: o.id } },
                    h("td", {}, h("a", { href: `#/orders/${encodeURIComponent(o.id)}` }, o.id.slice(0, 8))),
                    h("td", {}, new Date(o.createTime).toLocaleString()),
                    h("td", {}, (o.items ?? []).map((i) => `${i.quantity} × ${i.sku}`).join(", ")),
                    h("td", {}, money(o.total)),
                    h("td", { class: "status" }, orderStatus(o.status)),
                  ),
                ),
              ),
            )
          : h("p", {}, "No orders yet."),
        h(
          "nav",
          { class: "paging" },
          pageToken ? h("button", { type: "button", onclick: () => history.back() }, "Newer orders") : null,
          nextPageToken
            ? h("a", { class: "button", href: `#/orders?page=${encodeURIComponent(nextPageToken)}` }, "Older orders")
            : null,
        ),
      );
    } catch (error) {
      body.replaceChildren(notice(describe(error)));
    }
  };
  await refresh();
  every(REFRESH_MS, refresh);
}

async function loadStripe() {
  if (stripe) return stripe;
  if (!config.stripeJs) throw new Error("the page's configuration names no Stripe.js");
  await new Promise((resolve, reject) => {
    const script = h("script", { src: config.stripeJs });
    script.addEventListener("load", resolve);
    script.addEventListener("error", () => reject(new Error(`Stripe.js did not load from ${config.stripeJs}`)));
    document.head.append(script);
  });
  stripe = window.Stripe(config.publishableKey);
  return stripe;
}

async function orderPage(id) {
  if (!requireSignIn("Order")) return;
  const token = session.token();
  const summary = h("div", { id: "order-summary" }, h("p", { class: "muted" }, "Loading…"));
  const payments = h("div", { id: "payments" });
  const message = h("div", { id: "payment-message", "aria-live": "polite" });
  const cardField = h("div", { id: "card-element", class: "card-field" });
  const payButton = h("button", { type: "submit", id: "pay" }, "Pay");
  const payForm = h(
    "form",
    { id: "pay-form", hidden: true, onsubmit: (event) => { event.preventDefault(); pay(); } },
    h("h2", {}, "Pay by card"),
    cardField,
    payButton,
  );
  const cancelButton = h("button", { type: "button", id: "cancel", class: "secondary", hidden: true, onclick: () => cancel() }, "Cancel order");
  show(h("p", {}, h("a", { href: "#/orders" }, "← Orders")), summary, message, payForm, cancelButton, payments);

  let card = null;
  // A payment attempt whose answer was lost is sent again as it was (same card, same
  // request id); a declined or refused one is over, and the next card makes a new one.
  let attempt = null;

  const refresh = async () => {
    let order;
    let paymentList;
    try {
      ({ order } = await api.getOrder(token, id));
      ({ payments: paymentList = [] } = await api.listPayments(token, id));
    } catch (error) {
      summary.replaceChildren(notice(describe(error)));
      return;
    }
    summary.replaceChildren(
      h("h1", {}, `Order ${order.id.slice(0, 8)}`),
      h("p", {}, "Status: ", h("strong", { id: "order-status", class: "status" }, orderStatus(order.status))),
      h(
        "ul",
        { class: "items" },
        (order.items ?? []).map((i) => h("li", {}, `${i.quantity} × ${i.sku} at ${money(i.unitPrice)} = ${money(i.lineTotal)}`)),
      ),
      h("p", {}, "Total: ", h("strong", {}, money(order.total))),
      order.status === "ORDER_STATUS_PENDING_PAYMENT" && order.expireTime
        ? h("p", { class: "muted" }, `Unpaid orders expire at ${new Date(order.expireTime).toLocaleTimeString()}.`)
        : "",
    );
    payments.replaceChildren(
      paymentList.length ? h("h2", {}, "Payments") : "",
      paymentList.length
        ? h(
            "ul",
            { class: "payments" },
            paymentList.map((p) =>
              h(
                "li",
                { class: "payment", dataset: { status: paymentStatus(p.status) } },
                `${money(p.amount)}: ${paymentStatus(p.status)}`,
                p.failureMessage ? ` (${p.failureMessage})` : "",
                Number(p.amountRefunded?.units ?? 0) || Number(p.amountRefunded?.nanos ?? 0)
                  ? `, ${money(p.amountRefunded)} refunded`
                  : "",
              ),
            ),
          )
        : "",
    );
    const payable = order.status === "ORDER_STATUS_PENDING_PAYMENT";
    if (!payable && attempt) {
      // The attempt whose answer was lost went through after all: nothing to send again.
      attempt = null;
      message.replaceChildren(notice(`The order is ${orderStatus(order.status).toLowerCase()}.`, "info"));
    }
    payForm.hidden = !payable;
    cancelButton.hidden = !["ORDER_STATUS_PENDING_PAYMENT", "ORDER_STATUS_PAID"].includes(order.status);
    if (payable && !card) {
      try {
        card = (await loadStripe()).elements().create("card");
        card.mount(cardField);
      } catch (error) {
        message.replaceChildren(notice(`The card field could not be shown: ${error.message}`));
      }
    }
  };

  const pay = async () => {
    payButton.disabled = true;
    message.replaceChildren(notice("Paying…", "info"));
    try {
      if (!attempt) {
        const { paymentMethod, error } = await stripe.createPaymentMethod({ type: "card", card });
        if (error) {
          message.replaceChildren(notice(`The card was refused: ${error.message ?? "unknown reason"}`));
          return;
        }
        attempt = { paymentMethod: paymentMethod.id, requestId: crypto.randomUUID() };
      }
      const { payment } = await api.createPayment(token, id, attempt.requestId, attempt.paymentMethod);
      attempt = null;
      if (payment.status === "PAYMENT_STATUS_FAILED") {
        message.replaceChildren(
          notice(`The payment was declined: ${payment.failureMessage || payment.failureCode}. Try another card.`),
        );
      } else {
        message.replaceChildren(notice(`Payment ${paymentStatus(payment.status).toLowerCase()}.`, "info"));
      }
    } catch (error) {
      // Unreachable, overloaded or timed out (no answer, UNAVAILABLE, DEADLINE_EXCEEDED,
      // ABORTED, RESOURCE_EXHAUSTED): the next click sends the same attempt again. Any other
      // refusal is final for this attempt.
      if (error instanceof ApiError && ![14, 4, 10, 8].includes(error.code)) attempt = null;
      message.replaceChildren(notice(describe(error)));
    } finally {
      payButton.disabled = false;
      await refresh();
    }
  };

  const cancel = async () => {
    cancelButton.disabled = true;
    try {
      // One cancellation per order: the same id on every retry.
      await api.cancelOrder(token, id, `cancel-${id}`);
      message.replaceChildren(notice("The order is cancelled.", "info"));
    } catch (error) {
      message.replaceChildren(notice(describe(error)));
    } finally {
      cancelButton.disabled = false;
      await refresh();
    }
  };

  await refresh();
  every(REFRESH_MS, refresh);
}

// --- signing in ---------------------------------------------------------------------------

function signInPage() {
  const message = h("div", { id: "signin-message", "aria-live": "polite" });
  if (!config.devSignIn) {
    // Outside make run there is no sign-in route: a token from the identity provider.
    const tokenField = h("textarea", { id: "token", rows: 4, cols: 60, placeholder: "a bearer token (JWT)" });
    show(
      h("h1", {}, "Sign in"),
      h("p", {}, "Paste a bearer token:"),
      h(
        "form",
        {
          onsubmit: (event) => {
            event.preventDefault();
            const token = tokenField.value.trim();
            const claims = decodeClaims(token);
            if (!claims) {
              message.replaceChildren(notice("That is not a JWT."));
              return;
            }
            session.set({ token, subject: claims.sub, roles: claims.roles ?? [] });
            renderHeader();
            location.hash = "#/";
          },
        },
        tokenField,
        h("button", { type: "submit" }, "Sign in"),
      ),
      message,
    );
    return;
  }
  const name = h("input", { type: "text", id: "name", name: "name", required: true, placeholder: "alice", autocomplete: "username" });
  const signIn = async (role) => {
    try {
      const answer = await api.devSignIn(name.value.trim(), role);
      session.set({ token: answer.token, subject: answer.subject, roles: answer.roles });
      renderHeader();
      location.hash = role === "admin" ? "#/admin" : "#/";
    } catch (error) {
      message.replaceChildren(notice(describe(error)));
    }
  };
  show(
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Development stack: choose any customer name; the stack makes its token."),
    h(
      "form",
      { class: "inline", onsubmit: (event) => { event.preventDefault(); signIn("customer"); } },
      h("label", { for: "name" }, "Name "),
      name,
      h("button", { type: "submit", id: "sign-in" }, "Sign in"),
      h("button", { type: "button", id: "sign-in-admin", class: "secondary", onclick: () => signIn("admin") }, "Sign in as admin"),
    ),
    message,
  );
}

function decodeClaims(token) {
  try {
    const payload = token.split(".")[1].replaceAll("-", "+").replaceAll("_", "/");
    return JSON.parse(atob(payload));
  } catch {
    return null;
  }
}

// --- admin --------------------------------------------------------------------------------

async function adminPage() {
  if (!requireSignIn("Admin")) return;
  if (!session.isAdmin()) {
    show(h("h1", {}, "Admin"), notice("This needs an admin's sign-in."));
    return;
  }
  const token = session.token();
  const field = (id, label, attributes = {}) => [
    h("label", { for: id }, label),
    h("input", { id, name: id, ...attributes }),
  ];
  const createMessage = h("div", { id: "create-message", "aria-live": "polite" });
  const createForm = h(
    "form",
    { id: "create-product", class: "grid" },
    field("new-sku", "SKU", { required: true }),
    field("new-name", "Name", { required: true }),
    field("new-description", "Description"),
    field("new-price", "Price", { required: true, placeholder: "12.50" }),
    field("new-currency", "Currency", { value: "USD", required: true, size: 3 }),
    field("new-stock", "Stock", { type: "number", min: 0, value: 0 }),
    h("button", { type: "submit" }, "Create product"),
  );
  createForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = (id) => createForm.querySelector(`#${id}`).value;
    const price = toMoney(value("new-price"), value("new-currency"));
    if (!price) {
      createMessage.replaceChildren(notice("The price is an amount such as 12.50."));
      return;
    }
    try {
      const { product } = await api.createProduct(token, {
        sku: value("new-sku").trim(),
        name: value("new-name").trim(),
        description: value("new-description"),
        price,
        stock: String(Number(value("new-stock")) || 0),
      });
      createMessage.replaceChildren(
        h("p", { class: "notice info", role: "status" }, "Created ", productLink(product), ` (${product.sku}).`),
      );
      createForm.reset();
      loadChoices();
    } catch (error) {
      createMessage.replaceChildren(notice(describe(error)));
    }
  });

  const choice = h("select", { id: "adjust-product", name: "adjust-product" });
  const loadChoices = async () => {
    try {
      const { products = [] } = await api.listProducts("", 1000);
      choice.replaceChildren(...products.map((p) => h("option", { value: p.id }, `${p.sku}: ${p.name} (${p.stock})`)));
    } catch (error) {
      adjustMessage.replaceChildren(notice(describe(error)));
    }
  };
  const adjustMessage = h("div", { id: "adjust-message", "aria-live": "polite" });
  const delta = h("input", { id: "adjust-delta", type: "number", required: true, value: 1 });
  const reason = h("input", { id: "adjust-reason", required: true, value: "restock" });
  // Kept until an answer arrives: a retry of the same adjustment applies it once.
  let pending = null;
  const adjustForm = h(
    "form",
    { id: "adjust-stock", class: "grid" },
    h("label", { for: "adjust-product" }, "Product"),
    choice,
    h("label", { for: "adjust-delta" }, "Change"),
    delta,
    h("label", { for: "adjust-reason" }, "Reason"),
    reason,
    h("button", { type: "submit" }, "Adjust stock"),
  );
  adjustForm.addEventListener("input", () => { pending = null; });
  adjustForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    pending ??= crypto.randomUUID();
    try {
      const { product } = await api.adjustStock(token, choice.value, Number(delta.value), reason.value, pending);
      pending = null;
      adjustMessage.replaceChildren(notice(`${product.sku} now has ${product.stock} in stock.`, "info"));
      loadChoices();
    } catch (error) {
      adjustMessage.replaceChildren(notice(describe(error)));
    }
  });
  show(
    h("h1", {}, "Admin"),
    h("h2", {}, "New product"),
    createForm,
    createMessage,
    h("h2", {}, "Adjust stock"),
    adjustForm,
    adjustMessage,
  );
  await loadChoices();
}

// --- routing ------------------------------------------------------------------------------

async function route() {
  generation += 1;
  for (const stop of leaving) stop();
  leaving = [];
  renderHeader();
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query);
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  try {
    if (parts.length === 0) await catalogPage(params);
    else if (parts[0] === "product" && parts[1]) await productPage(parts[1]);
    else if (parts[0] === "cart") cartPage();
    else if (parts[0] === "orders" && parts[1]) await orderPage(parts[1]);
    else if (parts[0] === "orders") await ordersPage(params);
    else if (parts[0] === "signin") signInPage();
    else if (parts[0] === "admin") await adminPage();
    else show(h("h1", {}, "Not found"), h("a", { href: "#/" }, "Catalog"));
  } catch (error) {
    show(notice(describe(error)));
  }
}

async function start() {
  try {
    config = await api.config();
  } catch (error) {
    document.getElementById("banner").replaceChildren(notice(`The page's configuration did not load: ${describe(error)}`));
  }
  window.addEventListener("hashchange", route);
  await route();
  document.body.dataset.ready = "true";
}

start();
