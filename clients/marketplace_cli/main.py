"""The `marketplace` command: every command is one or a few calls of MarketplaceClient."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, TypeVar

import grpc
import typer
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from marketplace.catalog.v1 import catalog_pb2
from marketplace.order.v1 import order_pb2
from marketplace.payment.v1 import payment_pb2
from marketplace_cli import render
from marketplace_cli.exits import EXIT_CODES_HELP, Exit, exit_code_of, print_error
from marketplace_cli.importer import (
    ImportFileError,
    Outcome,
    RowResult,
    Summary,
    import_rows,
    parse_rows,
)
from marketplace_client import (
    MarketplaceClient,
    MarketplaceError,
    NotFoundError,
    Page,
    follow_pages,
)

T = TypeVar("T")
ItemT = TypeVar("ItemT")
MessageT = TypeVar("MessageT", bound=Message)

SERVER_ENV = "MARKETPLACE_SERVER"
TOKEN_ENV = "MARKETPLACE_TOKEN"  # noqa: S105 (the variable's name, not a token)
DEFAULT_SERVER = "127.0.0.1:50051"
# The services whose health `marketplace health` shows ("" is the whole server).
HEALTH_SERVICES = (
    "",
    "marketplace.catalog.v1.CatalogService",
    "marketplace.order.v1.OrderService",
    "marketplace.payment.v1.PaymentService",
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="marketplace",
    help=(
        "The Marketplace API from a terminal: products, orders, payments, a CSV import."
        f" The server is --server or ${SERVER_ENV} (default {DEFAULT_SERVER}); the bearer"
        f" token is ${TOKEN_ENV} (`make token ROLE=admin SUB=me` prints one)."
        f"\n\n{EXIT_CODES_HELP}"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
products_app = typer.Typer(help="The catalog: read by anyone, written by admins.")
orders_app = typer.Typer(help="Orders: a customer's own, or every order for an admin.")
payments_app = typer.Typer(help="Payments of orders; refunds (admin).")
app.add_typer(products_app, name="products", no_args_is_help=True)
app.add_typer(orders_app, name="orders", no_args_is_help=True)
app.add_typer(payments_app, name="payments", no_args_is_help=True)


@dataclass(frozen=True)
class Settings:
    server: str
    token: str | None
    as_json: bool
    timeout: float
    ca_cert: Path | None
    client_cert: Path | None
    client_key: Path | None

    def client(self) -> MarketplaceClient:
        credentials = None
        if self.ca_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.ca_cert.read_bytes(),
                private_key=self.client_key.read_bytes() if self.client_key else None,
                certificate_chain=self.client_cert.read_bytes() if self.client_cert else None,
            )
        return MarketplaceClient(
            self.server, token=self.token, credentials=credentials, timeout=self.timeout
        )


JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print proto3 JSON (as the REST API) instead of tables.")
]
PageSize = Annotated[int, typer.Option(min=0, max=1000, help="Items per page (0: the server's).")]
PageToken = Annotated[str, typer.Option(help="The next page, as a previous listing printed.")]
AllPages = Annotated[bool, typer.Option("--all", help="Every page, from the first.")]
RequestId = Annotated[
    str | None,
    typer.Option(
        help="Idempotency key: the same key again (a retry) is applied once. Default: new."
    ),
]


@app.callback()
def main(
    ctx: typer.Context,
    server: Annotated[
        str, typer.Option(envvar=SERVER_ENV, help="The gRPC server, host:port.")
    ] = DEFAULT_SERVER,
    as_json: JsonFlag = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds per call attempt.")] = 10.0,
    ca_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="MARKETPLACE_CA_CERT",
            exists=True,
            dir_okay=False,
            help="Speak TLS, trusting this CA (PEM).",
        ),
    ] = None,
    client_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="MARKETPLACE_CLIENT_CERT",
            exists=True,
            dir_okay=False,
            help="With --ca-cert: this client certificate (PEM), for mutual TLS.",
        ),
    ] = None,
    client_key: Annotated[
        Path | None,
        typer.Option(
            envvar="MARKETPLACE_CLIENT_KEY",
            exists=True,
            dir_okay=False,
            help="With --client-cert: its private key (PEM).",
        ),
    ] = None,
) -> None:
    if (client_cert is None) != (client_key is None):
        raise typer.BadParameter("give --client-cert and --client-key together")
    if client_cert is not None and ca_cert is None:
        raise typer.BadParameter("--client-cert needs --ca-cert (TLS)")
    # The token only from the environment: a command line is visible to every user in `ps`.
    ctx.obj = Settings(
        server=server,
        token=os.environ.get(TOKEN_ENV) or None,
        as_json=as_json,
        timeout=timeout,
        ca_cert=ca_cert,
        client_cert=client_cert,
        client_key=client_key,
    )


def settings_of(ctx: typer.Context, as_json: bool) -> Settings:
    settings = ctx.find_object(Settings)
    assert settings is not None, "the app's callback sets the settings"
    return dataclasses.replace(settings, as_json=True) if as_json else settings


def call(
    settings: Settings,
    work: Callable[[MarketplaceClient], Awaitable[T]],
    labels: dict[str, str] | None = None,
) -> T:
    """Runs `work` with a client; a failed call is printed from its details and ends the
    command with the exit code of its kind (refused, unavailable, failed)."""

    async def run() -> T:
        async with settings.client() as client:
            return await work(client)

    try:
        return asyncio.run(run())
    except MarketplaceError as error:
        print_error(err, error, as_json=settings.as_json, labels=labels)
        if error.code == grpc.StatusCode.UNAVAILABLE and not settings.as_json:
            err.print(f"Is the server at {settings.server} up? (--server or ${SERVER_ENV})")
        raise typer.Exit(exit_code_of(error)) from None


def parse_amount(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise typer.BadParameter(f"{value!r} is not a decimal amount such as 12.50") from None
    if not amount.is_finite():
        raise typer.BadParameter(f"{value!r} is not a decimal amount such as 12.50")
    return amount


Amount = Annotated[
    Decimal | None,
    typer.Option(parser=parse_amount, help="A decimal amount, e.g. 12.50."),
]


def looks_like_id(reference: str) -> bool:
    """Only the canonical form (8-4-4-4-12 hex): uuid.UUID also takes 32 bare hex digits,
    which are a valid SKU too."""
    try:
        return str(uuid.UUID(reference)) == reference.lower()
    except ValueError:
        return False


async def resolve_products(client: MarketplaceClient, references: list[str]) -> list[str]:
    """Product ids for ids or SKUs; the SKUs are found in one pass over the catalog (there
    is no RPC by SKU)."""
    skus = {r for r in references if not looks_like_id(r)}
    found: dict[str, str] = {}
    if skus:
        async for product in client.list_products(page_size=1000):
            if product.sku in skus:
                found[product.sku] = product.id
    for reference in references:
        if reference in skus and reference not in found:
            raise NotFoundError(grpc.StatusCode.NOT_FOUND, f"no product has the SKU {reference!r}")
    return [found.get(r, r) for r in references]


async def resolve_product(client: MarketplaceClient, reference: str) -> str:
    return (await resolve_products(client, [reference]))[0]


async def one_or_all(
    fetch: Callable[[int, str], Awaitable[Page[ItemT]]],
    page_size: int,
    page_token: str,
    every: bool,
) -> Page[ItemT]:
    """The page asked for, or with `every` all of them from the first (as one page)."""
    if not every:
        return await fetch(page_size, page_token)
    return Page([item async for item in follow_pages(fetch, page_size)], "")


def listing_command(command: str, page_size: int) -> str:
    return f"{command} --page-size {page_size}" if page_size else command


def print_page(
    settings: Settings, key: str, page: Page[MessageT], table: Table, command: str
) -> None:
    if settings.as_json:
        body: dict[str, object] = {key: [render.message_json(i) for i in page.items]}
        if page.next_page_token:
            body["nextPageToken"] = page.next_page_token
        render.print_json(body)
        return
    out.print(table)
    render.print_page_hint(err, page.next_page_token, command)


def print_message(settings: Settings, message: Message, *tables: Table) -> None:
    if settings.as_json:
        render.print_json(render.message_json(message))
        return
    for table in tables:
        out.print(table)


# Products


@products_app.command("list")
def products_list(
    ctx: typer.Context,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    every: AllPages = False,
    as_json: JsonFlag = False,
) -> None:
    """Products by SKU, with price and stock."""
    settings = settings_of(ctx, as_json)
    page = call(
        settings,
        lambda client: one_or_all(client.list_products_page, page_size, page_token, every),
    )
    table = render.products_table(page.items)
    print_page(
        settings, "products", page, table, listing_command("marketplace products list", page_size)
    )


@products_app.command("get")
def products_get(
    ctx: typer.Context,
    product: Annotated[str, typer.Argument(help="The product's id or SKU.")],
    as_json: JsonFlag = False,
) -> None:
    """One product."""
    settings = settings_of(ctx, as_json)

    async def work(client: MarketplaceClient) -> catalog_pb2.Product:
        return await client.get_product(await resolve_product(client, product))

    found = call(settings, work)
    print_message(settings, found, render.product_table(found))


@products_app.command("create")
def products_create(
    ctx: typer.Context,
    sku: Annotated[str, typer.Option(help="Unique: 1-64 of A-Z a-z 0-9 . _ -")],
    name: Annotated[str, typer.Option()],
    price: Annotated[Decimal, typer.Option(parser=parse_amount, help="E.g. 12.50.")],
    currency: Annotated[str, typer.Option(help="ISO 4217, e.g. USD.")],
    description: Annotated[str, typer.Option()] = "",
    stock: Annotated[int, typer.Option(min=0)] = 0,
    warehouse: Annotated[
        bool, typer.Option("--warehouse", help="The warehouse counts its stock (then --stock 0).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Creates a product (admin)."""
    settings = settings_of(ctx, as_json)
    source = (
        catalog_pb2.INVENTORY_SOURCE_WAREHOUSE
        if warehouse
        else catalog_pb2.INVENTORY_SOURCE_MANAGED_HERE
    )
    created = call(
        settings,
        lambda client: client.create_product(
            sku=sku,
            name=name,
            description=description,
            price=price,
            currency=currency.upper(),
            stock=stock,
            inventory_source=source,
        ),
    )
    print_message(settings, created, render.product_table(created))


@products_app.command("update")
def products_update(
    ctx: typer.Context,
    product: Annotated[str, typer.Argument(help="The product's id or SKU.")],
    sku: Annotated[str | None, typer.Option(help="A new SKU.")] = None,
    name: Annotated[str | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
    price: Amount = None,
    currency: Annotated[str | None, typer.Option(help="With --price.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Changes the fields given, nothing else (admin). Stock: adjust-stock."""
    settings = settings_of(ctx, as_json)
    if (price is None) != (currency is None):
        raise typer.BadParameter("give --price and --currency together")
    if sku is None and name is None and description is None and price is None:
        raise typer.BadParameter("give at least one of --sku, --name, --description, --price")

    async def work(client: MarketplaceClient) -> catalog_pb2.Product:
        return await client.update_product(
            await resolve_product(client, product),
            sku=sku,
            name=name,
            description=description,
            price=price,
            currency=currency.upper() if currency else None,
        )

    updated = call(settings, work)
    print_message(settings, updated, render.product_table(updated))


@products_app.command("adjust-stock")
def products_adjust_stock(
    ctx: typer.Context,
    product: Annotated[str, typer.Argument(help="The product's id or SKU.")],
    delta: Annotated[int, typer.Option(help="Units to add; negative removes (--delta=-3).")],
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "",
    request_id: RequestId = None,
    as_json: JsonFlag = False,
) -> None:
    """Adds or removes stock (admin); never below zero."""
    settings = settings_of(ctx, as_json)

    async def work(client: MarketplaceClient) -> catalog_pb2.Product:
        product_id = await resolve_product(client, product)
        return await client.adjust_stock(product_id, delta, reason, request_id=request_id)

    adjusted = call(settings, work)
    print_message(settings, adjusted, render.product_table(adjusted))


# Orders


def parse_line(value: str) -> tuple[str, int]:
    reference, _, quantity = value.rpartition(":")
    if not reference:
        return value, 1
    if not quantity.isdigit():
        raise typer.BadParameter(f"{value!r}: the quantity after ':' is not a whole number")
    return reference, int(quantity)


@orders_app.command("create")
def orders_create(
    ctx: typer.Context,
    lines: Annotated[
        list[str],
        typer.Argument(
            metavar="PRODUCT[:QUANTITY]",
            help="Product id or SKU, and units (default 1): MUG-01:2 TEE-M",
        ),
    ],
    request_id: RequestId = None,
    as_json: JsonFlag = False,
) -> None:
    """Places an order (a customer token). Out of stock: the short lines and what is left."""
    settings = settings_of(ctx, as_json)
    items = [parse_line(line) for line in lines]
    key = request_id or str(uuid.uuid4())
    # What the person typed, to name the short lines of an out-of-stock refusal.
    labels: dict[str, str] = {}

    async def work(client: MarketplaceClient) -> order_pb2.Order:
        product_ids = await resolve_products(client, [reference for reference, _ in items])
        for product_id, (reference, _) in zip(product_ids, items, strict=True):
            labels[f"products/{product_id}"] = reference
        resolved = [(pid, quantity) for pid, (_, quantity) in zip(product_ids, items, strict=True)]
        return await client.create_order(resolved, request_id=key)

    if not settings.as_json:
        err.print(f"request id {key} (retry with --request-id {key}: placed once)", soft_wrap=True)
    order = call(settings, work, labels)
    print_message(settings, order, *render.order_tables(order))


@orders_app.command("list")
def orders_list(
    ctx: typer.Context,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    every: AllPages = False,
    as_json: JsonFlag = False,
) -> None:
    """Your orders, newest first (every order for an admin)."""
    settings = settings_of(ctx, as_json)
    page = call(
        settings,
        lambda client: one_or_all(client.list_orders_page, page_size, page_token, every),
    )
    table = render.orders_table(page.items)
    print_page(
        settings, "orders", page, table, listing_command("marketplace orders list", page_size)
    )


@orders_app.command("get")
def orders_get(
    ctx: typer.Context,
    order_id: Annotated[str, typer.Argument(metavar="ORDER_ID")],
    as_json: JsonFlag = False,
) -> None:
    """One order and its lines."""
    settings = settings_of(ctx, as_json)
    order = call(settings, lambda client: client.get_order(order_id))
    print_message(settings, order, *render.order_tables(order))


@orders_app.command("cancel")
def orders_cancel(
    ctx: typer.Context,
    order_id: Annotated[str, typer.Argument(metavar="ORDER_ID")],
    request_id: RequestId = None,
    as_json: JsonFlag = False,
) -> None:
    """Cancels an order; a paid one is refunded first."""
    settings = settings_of(ctx, as_json)
    order = call(settings, lambda client: client.cancel_order(order_id, request_id=request_id))
    print_message(settings, order, *render.order_tables(order))


# Payments


@payments_app.command("create")
def payments_create(
    ctx: typer.Context,
    order_id: Annotated[str, typer.Argument(metavar="ORDER_ID")],
    payment_method: Annotated[
        str,
        typer.Argument(
            metavar="PAYMENT_METHOD",
            help="A provider PaymentMethod id (pm_...); `make card` prints one.",
        ),
    ],
    request_id: RequestId = None,
    as_json: JsonFlag = False,
) -> None:
    """Pays an order. A declined card prints the reason and exits 3."""
    settings = settings_of(ctx, as_json)
    key = request_id or str(uuid.uuid4())
    if not settings.as_json:
        err.print(f"request id {key} (retry with --request-id {key}: charged once)", soft_wrap=True)
    payment = call(
        settings, lambda client: client.create_payment(order_id, payment_method, request_id=key)
    )
    print_message(settings, payment, render.payment_table(payment))
    if payment.status == payment_pb2.PAYMENT_STATUS_PENDING and not settings.as_json:
        err.print(
            "pending: the payment provider has not answered yet;"
            f" `marketplace payments get {payment.id}` shows the outcome once it does",
            soft_wrap=True,
        )
    if payment.status == payment_pb2.PAYMENT_STATUS_FAILED:
        if not settings.as_json:
            err.print(
                f"[bold red]declined:[/] {escape(payment.failure_message)}"
                f" ({escape(payment.failure_code)}); try another payment method"
            )
        raise typer.Exit(Exit.REFUSED)


@payments_app.command("list")
def payments_list(
    ctx: typer.Context,
    order_id: Annotated[str, typer.Argument(metavar="ORDER_ID")],
    page_size: PageSize = 0,
    page_token: PageToken = "",
    every: AllPages = False,
    as_json: JsonFlag = False,
) -> None:
    """An order's payments, newest first."""
    settings = settings_of(ctx, as_json)

    async def work(client: MarketplaceClient) -> Page[payment_pb2.Payment]:
        async def fetch(size: int, token: str) -> Page[payment_pb2.Payment]:
            return await client.list_payments_page(order_id, size, token)

        return await one_or_all(fetch, page_size, page_token, every)

    page = call(settings, work)
    table = render.payments_table(page.items)
    print_page(
        settings,
        "payments",
        page,
        table,
        listing_command(f"marketplace payments list {order_id}", page_size),
    )


@payments_app.command("get")
def payments_get(
    ctx: typer.Context,
    payment_id: Annotated[str, typer.Argument(metavar="PAYMENT_ID")],
    as_json: JsonFlag = False,
) -> None:
    """One payment."""
    settings = settings_of(ctx, as_json)
    payment = call(settings, lambda client: client.get_payment(payment_id))
    print_message(settings, payment, render.payment_table(payment))


@payments_app.command("refund")
def payments_refund(
    ctx: typer.Context,
    payment_id: Annotated[str, typer.Argument(metavar="PAYMENT_ID")],
    amount: Amount = None,
    currency: Annotated[str | None, typer.Option(help="With --amount.")] = None,
    reason: Annotated[str, typer.Option()] = "",
    request_id: RequestId = None,
    as_json: JsonFlag = False,
) -> None:
    """Refunds a payment (admin): --amount, or everything left."""
    settings = settings_of(ctx, as_json)
    if (amount is None) != (currency is None):
        raise typer.BadParameter("give --amount and --currency together")
    key = request_id or str(uuid.uuid4())
    payment = call(
        settings,
        lambda client: client.refund_payment(
            payment_id,
            amount=amount,
            currency=currency.upper() if currency else None,
            reason=reason,
            request_id=key,
        ),
    )
    print_message(settings, payment, render.payment_table(payment))


# Health


@app.command("health")
def health(
    ctx: typer.Context,
    service: Annotated[
        list[str] | None,
        typer.Option(help="A full service name to check (repeatable). Default: all of them."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """grpc.health.v1 status of the server and its services; exits 69 unless all SERVING."""
    settings = settings_of(ctx, as_json)
    names = tuple(service) if service else HEALTH_SERVICES

    async def work(client: MarketplaceClient) -> dict[str, str]:
        return {name: await client.check_health(name) for name in names}

    statuses = call(settings, work)
    if settings.as_json:
        render.print_json({"statuses": statuses})
    else:
        table = render.table("Service", "Status")
        for name, status in statuses.items():
            colour = "green" if status == "SERVING" else "red"
            table.add_row(name or "(server)", f"[{colour}]{status}[/]")
        out.print(table)
    if any(status != "SERVING" for status in statuses.values()):
        raise typer.Exit(Exit.UNAVAILABLE)


# Import


@app.command("import")
def import_products(
    ctx: typer.Context,
    csv_file: Annotated[
        Path,
        typer.Argument(
            metavar="PRODUCTS.csv",
            exists=True,
            dir_okay=False,
            help="Columns sku, name, description, price, currency, stock (empty: leave as is).",
        ),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Creates or updates products from a CSV (admin); exits 3 if a row was refused.

    Rows equal to the catalog are left alone, so importing a file twice changes nothing
    the second time; a refused row is reported and the others go on."""
    settings = settings_of(ctx, as_json)
    try:
        rows = parse_rows(csv_file.read_text(encoding="utf-8-sig"))
    except (ImportFileError, UnicodeDecodeError) as error:
        raise typer.BadParameter(str(error), param_hint="PRODUCTS.csv") from None
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[sku]}"),
        TimeElapsedColumn(),
        console=err,
        disable=settings.as_json,
    )
    task = progress.add_task(f"Importing {csv_file.name}", total=len(rows), sku="")

    def advance(result: RowResult) -> None:
        progress.update(task, advance=1, sku=result.sku)

    with progress:
        summary = call(
            settings,
            lambda client: import_rows(
                client, rows, reason=f"import of {csv_file.name}", advance=advance
            ),
        )
    print_summary(settings, summary)
    if summary.stopped_by is not None:
        # --json: the summary on stdout carries the error as stoppedBy
        if not settings.as_json:
            print_error(err, summary.stopped_by, as_json=False)
            err.print(
                f"Stopped after {len(summary.results)} of {len(rows)} rows; the same import"
                " again goes on where this one stopped."
            )
        raise typer.Exit(exit_code_of(summary.stopped_by))
    if summary.refused:
        raise typer.Exit(Exit.REFUSED)


def print_summary(settings: Settings, summary: Summary) -> None:
    if settings.as_json:
        render.print_json(summary.as_json())
        return
    # Created and unchanged rows are counted; the rows to read are what changed and why not.
    noted = [r for r in summary.results if r.outcome in (Outcome.UPDATED, Outcome.REFUSED)]
    if noted:
        table = render.table(Column("Line", justify="right"), "SKU", "Outcome", "Detail")
        colours = {Outcome.UPDATED: "cyan", Outcome.REFUSED: "red"}
        for r in noted:
            outcome = f"[{colours[r.outcome]}]{r.outcome}[/]"
            table.add_row(str(r.line), escape(r.sku), outcome, escape(r.detail))
        out.print(table)
    out.print(
        ", ".join(f"{summary.count(outcome)} {outcome}" for outcome in Outcome),
    )
