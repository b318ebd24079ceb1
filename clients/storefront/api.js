// The Marketplace REST API as the page uses it: same origin, through Envoy, JSON in
// protobuf's mapping. Every refusal becomes an ApiError carrying the server's own
// google.rpc.Status (message and details), so the page shows what the server said.

const STATUS_TYPE = "type.googleapis.com/google.rpc.";

export class ApiError extends Error {
  constructor(httpStatus, status) {
    super(status.message || `HTTP ${httpStatus}`);
    this.httpStatus = httpStatus;
    this.code = status.code;
    this.details = Array.isArray(status.details) ? status.details : [];
  }

  detail(kind) {
    return this.details.find((d) => d["@type"] === STATUS_TYPE + kind);
  }

  get reason() {
    return this.detail("ErrorInfo")?.reason ?? "";
  }

  // Precondition violations (which order lines are short, and how) and field violations.
  get violations() {
    return this.detail("PreconditionFailure")?.violations ?? [];
  }

  get fieldViolations() {
    return this.detail("BadRequest")?.fieldViolations ?? [];
  }
}

// What a person reads for any failure: the server's message and the fields it names, or,
// when the server could not be reached at all, the browser's own reason.
export function describe(error) {
  if (error instanceof ApiError) {
    const fields = error.fieldViolations.map((v) => `${v.field}: ${v.description}`);
    return [error.message, ...fields].join("; ");
  }
  return `the service could not be reached (${error?.message ?? error})`;
}

export async function call(method, path, { body, token } = {}) {
  const headers = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : {};
  } catch {
    parsed = null;
  }
  if (!response.ok) {
    const status =
      parsed && typeof parsed.message === "string"
        ? parsed
        : { code: 2, message: `HTTP ${response.status}: ${text.slice(0, 200)}`, details: [] };
    throw new ApiError(response.status, status);
  }
  if (parsed === null) {
    throw new ApiError(response.status, { code: 2, message: "the answer was not JSON" });
  }
  return parsed;
}

const q = (params) => {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value) search.set(key, value);
  const text = search.toString();
  return text ? `?${text}` : "";
};

export const api = {
  listProducts: (pageToken, pageSize = 10) =>
    call("GET", `/v1/products${q({ pageSize, pageToken })}`),
  getProduct: (id) => call("GET", `/v1/products/${encodeURIComponent(id)}`),
  createProduct: (token, product) => call("POST", "/v1/products", { token, body: product }),
  adjustStock: (token, id, delta, reason, requestId) =>
    call("POST", `/v1/products/${encodeURIComponent(id)}:adjustStock`, {
      token,
      body: { delta: String(delta), reason, requestId },
    }),
  createOrder: (token, requestId, items) =>
    call("POST", "/v1/orders", { token, body: { requestId, items } }),
  listOrders: (token, pageToken) =>
    call("GET", `/v1/orders${q({ pageSize: 20, pageToken })}`, { token }),
  getOrder: (token, id) => call("GET", `/v1/orders/${encodeURIComponent(id)}`, { token }),
  cancelOrder: (token, id, requestId) =>
    call("POST", `/v1/orders/${encodeURIComponent(id)}:cancel`, { token, body: { requestId } }),
  createPayment: (token, orderId, requestId, paymentMethod) =>
    call("POST", `/v1/orders/${encodeURIComponent(orderId)}/payments`, {
      token,
      body: { requestId, paymentMethod },
    }),
  listPayments: (token, orderId) =>
    call("GET", `/v1/orders/${encodeURIComponent(orderId)}/payments`, { token }),
  // Only under make run (devstack/web.py); never part of the API.
  devSignIn: (name, role) => call("POST", "/dev/token", { body: { name, role } }),
  config: () => call("GET", "/storefront/config.json"),
};

// google.type.Money as a person reads it; units are an int64, so a JSON string.
export function money(value) {
  if (!value || !value.currencyCode) return "";
  const amount = Number(value.units ?? 0) + Number(value.nanos ?? 0) / 1e9;
  try {
    return new Intl.NumberFormat("en-US", { style: "currency", currency: value.currencyCode })
      .format(amount);
  } catch {
    return `${amount.toFixed(2)} ${value.currencyCode}`;
  }
}

// "12.50" and a currency as google.type.Money; null when it is not an amount.
export function toMoney(text, currencyCode) {
  const match = /^\s*(\d+)(?:\.(\d{1,9}))?\s*$/.exec(text);
  if (!match) return null;
  const nanos = Number((match[2] ?? "").padEnd(9, "0"));
  return { currencyCode: currencyCode.trim().toUpperCase(), units: match[1], nanos };
}

// ORDER_STATUS_PENDING_PAYMENT -> PENDING PAYMENT
export function statusName(value, prefix) {
  return String(value ?? "").replace(prefix, "").replaceAll("_", " ");
}
