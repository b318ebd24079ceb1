"""The `marketplace` command line against the real stack: each command through Typer's
CliRunner (in this process), the installed console script as a subprocess, the import's
idempotence checked through the API and the database, and the exit codes a script relies on.

The tests are synchronous: each CLI command runs its own event loop (asyncio.run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner, Result

from devstack.localstripe import create_test_payment_method
from devstack.postgres import create_database, drop_database
from devstack.processes import free_port
from devstack.tls import TlsFiles, make_development_tls
from marketplace_cli.main import app
from tests.conftest import Tokens, insert_product, stock_of
from tests.stack import Stack, running_stack

pytestmark = pytest.mark.e2e

GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000341"
REFUSED, UNAVAILABLE, USAGE = 3, 69, 2


def cli(stack: Stack, token: str | None, *args: str, server: str | None = None) -> Result:
    env = {
        "MARKETPLACE_SERVER": server or stack.grpc_target,
        "MARKETPLACE_TOKEN": token,
        # wide enough that no id or SKU is cut short in a table
        "COLUMNS": "240",
    }
    return CliRunner().invoke(app, list(args), env=env)


def ok_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8].upper()}"


def write_csv(tmp_path: Path, name: str, *rows: str) -> Path:
    path = tmp_path / name
    path.write_text("sku,name,description,price,currency,stock\n" + "\n".join(rows) + "\n")
    return path


def settled(stack: Stack, token: str, payment_id: str, within: float = 30) -> Any:
    """The payment once its outcome is known: under load the provider may answer after the
    stack's 1 s PROVIDER_TIMEOUT, and the payment is PENDING until reconciliation."""
    deadline = time.monotonic() + within
    while True:
        payment = ok_json(cli(stack, token, "--json", "payments", "get", payment_id))
        if payment["status"] != "PAYMENT_STATUS_PENDING":
            return payment
        if time.monotonic() >= deadline:
            raise AssertionError(f"payment {payment_id} still PENDING after {within} s")
        time.sleep(0.2)


def stock_adjustments_of(stack: Stack, product_ids: list[str]) -> int:
    with psycopg.connect(stack.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM stock_adjustments WHERE product_id = ANY(%s::uuid[])",
            (product_ids,),
        ).fetchone()
    assert row is not None
    count: int = row[0]
    return count


def products_by_sku(stack: Stack, skus: set[str]) -> dict[str, dict[str, Any]]:
    listed = ok_json(cli(stack, None, "--json", "products", "list", "--all"))["products"]
    return {p["sku"]: p for p in listed if p["sku"] in skus}


def test_products_create_list_get_update_and_adjust_stock(stack: Stack, tokens: Tokens) -> None:
    admin = tokens.admin()
    sku = unique("CLI-LAMP")
    created = ok_json(
        cli(
            stack,
            admin,
            "products",
            "create",
            "--sku",
            sku,
            "--name",
            "Desk lamp",
            "--price",
            "39.90",
            "--currency",
            "usd",
            "--stock",
            "7",
            "--json",
        )
    )
    assert created["sku"] == sku
    assert created["price"] == {"currencyCode": "USD", "units": "39", "nanos": 900000000}
    assert created["stock"] == "7"  # int64 as a string: the JSON mapping
    product_id = created["id"]

    assert products_by_sku(stack, {sku})[sku]["id"] == product_id

    shown = cli(stack, None, "products", "get", sku)
    assert shown.exit_code == 0, shown.output
    assert "Desk lamp" in shown.stdout
    assert "39.90 USD" in shown.stdout
    assert product_id in shown.stdout

    listed = cli(stack, None, "products", "list", "--all")
    assert listed.exit_code == 0, listed.output
    assert any(sku in line and "39.90 USD" in line for line in listed.stdout.splitlines())

    updated = ok_json(
        cli(
            stack,
            admin,
            "--json",
            "products",
            "update",
            product_id,
            "--price",
            "42.00",
            "--currency",
            "USD",
            "--name",
            "Desk lamp, brass",
        )
    )
    assert updated["name"] == "Desk lamp, brass"
    assert updated["price"]["units"] == "42"
    assert updated["stock"] == "7"

    adjusted = ok_json(
        cli(
            stack,
            admin,
            "products",
            "adjust-stock",
            sku,
            "--delta=-3",
            "--reason",
            "count",
            "--json",
        )
    )
    assert adjusted["stock"] == "4"
    assert stock_of(stack.database_url, product_id) == 4


def test_a_customer_cannot_create_products_and_is_told_why(stack: Stack, tokens: Tokens) -> None:
    result = cli(
        stack,
        tokens.customer(),
        "products",
        "create",
        "--sku",
        unique("CLI-NOPE"),
        "--name",
        "Nope",
        "--price",
        "1.00",
        "--currency",
        "USD",
    )
    assert result.exit_code == REFUSED, result.output
    assert "PERMISSION_DENIED" in result.stderr


def test_a_bad_field_is_named(stack: Stack, tokens: Tokens) -> None:
    result = cli(
        stack,
        tokens.admin(),
        "products",
        "create",
        "--sku",
        "has spaces",
        "--name",
        "Bad",
        "--price",
        "1.005",
        "--currency",
        "USD",
    )
    assert result.exit_code == REFUSED, result.output
    assert "INVALID_ARGUMENT" in result.stderr
    assert "product.sku:" in result.stderr
    assert "product.price:" in result.stderr


def test_orders_create_list_get_and_cancel(stack: Stack, tokens: Tokens) -> None:
    customer = tokens.customer(unique("cli-buyer"))
    sku = unique("CLI-MUG")
    product_id = insert_product(stack.database_url, stock=10, price="12.50", sku=sku)

    placed = cli(stack, customer, "orders", "create", f"{sku}:2", "--request-id", "order-1")
    assert placed.exit_code == 0, placed.output
    assert "PENDING_PAYMENT" in placed.stdout
    assert "25.00 USD" in placed.stdout
    assert stock_of(stack.database_url, product_id) == 8

    # The same request id again is the same order, placed once.
    again = ok_json(
        cli(stack, customer, "--json", "orders", "create", f"{sku}:2", "--request-id", "order-1")
    )
    assert again["status"] == "ORDER_STATUS_PENDING_PAYMENT"
    assert again["items"][0] == {
        "productId": product_id,
        "quantity": 2,
        "sku": sku,
        "unitPrice": {"currencyCode": "USD", "units": "12", "nanos": 500000000},
        "lineTotal": {"currencyCode": "USD", "units": "25"},
    }
    assert stock_of(stack.database_url, product_id) == 8
    order_id = again["id"]

    listed = ok_json(cli(stack, customer, "--json", "orders", "list"))
    assert [o["id"] for o in listed["orders"]] == [order_id]
    table = cli(stack, customer, "orders", "list")
    assert order_id in table.stdout
    assert f"{sku} x2" in table.stdout

    got = cli(stack, customer, "orders", "get", order_id)
    assert got.exit_code == 0, got.output
    assert "PENDING_PAYMENT" in got.stdout

    cancelled = ok_json(cli(stack, customer, "orders", "cancel", order_id, "--json"))
    assert cancelled["status"] == "ORDER_STATUS_CANCELLED"
    assert stock_of(stack.database_url, product_id) == 10


def test_out_of_stock_names_the_short_lines_and_exits_refused(stack: Stack, tokens: Tokens) -> None:
    short_sku, fine_sku = unique("CLI-SHORT"), unique("CLI-FINE")
    short_id = insert_product(stack.database_url, stock=2, sku=short_sku)
    insert_product(stack.database_url, stock=50, sku=fine_sku)

    result = cli(stack, tokens.customer(), "orders", "create", f"{short_sku}:5", f"{fine_sku}:1")

    assert result.exit_code == REFUSED, result.output
    assert "OUT_OF_STOCK" in result.stderr
    assert f"{short_sku} (products/{short_id}): requested 5, available 2" in result.stderr
    assert fine_sku not in result.stderr
    assert stock_of(stack.database_url, short_id) == 2

    as_json = cli(stack, tokens.customer(), "--json", "orders", "create", f"{short_sku}:5")
    assert as_json.exit_code == REFUSED
    error = json.loads(as_json.stderr)["error"]
    assert error["reason"] == "OUT_OF_STOCK"
    assert error["preconditionViolations"] == [
        {
            "type": "OUT_OF_STOCK",
            "subject": f"products/{short_id}",
            "description": "requested 5, available 2",
        }
    ]


def test_payments_create_list_and_refund(stack: Stack, tokens: Tokens) -> None:
    customer = tokens.customer(unique("cli-payer"))
    sku = unique("CLI-PAY")
    insert_product(stack.database_url, stock=5, price="20.00", sku=sku)
    order = ok_json(cli(stack, customer, "--json", "orders", "create", f"{sku}:1"))

    declined_card = create_test_payment_method(stack.localstripe_port, DECLINED_CARD)
    declined = cli(stack, customer, "payments", "create", order["id"], declined_card)
    if "PENDING" in declined.stdout:
        # The provider answered after the stack's 1 s provider timeout (a busy machine):
        # the CLI says how to follow it, and reconciliation settles it.
        assert declined.exit_code == 0, declined.output
        assert "payments get" in declined.stderr
    else:
        assert declined.exit_code == REFUSED, declined.output
        assert "FAILED" in declined.stdout
        assert "declined: Your card was declined. (card_declined)" in declined.stderr
    declined_id = next(
        p["id"]
        for p in ok_json(cli(stack, customer, "--json", "payments", "list", order["id"]))[
            "payments"
        ]
    )
    assert settled(stack, customer, declined_id)["status"] == "PAYMENT_STATUS_FAILED"

    good_card = create_test_payment_method(stack.localstripe_port, GOOD_CARD)
    paid = ok_json(cli(stack, customer, "--json", "payments", "create", order["id"], good_card))
    assert settled(stack, customer, paid["id"])["status"] == "PAYMENT_STATUS_SUCCEEDED"
    shown = ok_json(cli(stack, customer, "--json", "orders", "get", order["id"]))
    assert shown["status"] == "ORDER_STATUS_PAID"

    listed = ok_json(cli(stack, customer, "--json", "payments", "list", order["id"]))
    assert [p["status"] for p in listed["payments"]] == [
        "PAYMENT_STATUS_SUCCEEDED",
        "PAYMENT_STATUS_FAILED",
    ]

    # Refunds are an admin's; the customer is refused.
    refused = cli(stack, customer, "payments", "refund", paid["id"])
    assert refused.exit_code == REFUSED
    assert "PERMISSION_DENIED" in refused.stderr

    admin = tokens.admin()
    partial = ok_json(
        cli(
            stack,
            admin,
            "--json",
            "payments",
            "refund",
            paid["id"],
            "--amount",
            "5.00",
            "--currency",
            "USD",
            "--reason",
            "scratched",
        )
    )
    assert partial["status"] == "PAYMENT_STATUS_PARTIALLY_REFUNDED"
    assert partial["amountRefunded"] == {"currencyCode": "USD", "units": "5"}
    rest = cli(stack, admin, "payments", "refund", paid["id"])
    assert rest.exit_code == 0, rest.output
    assert "REFUNDED" in rest.stdout
    assert "20.00 USD" in rest.stdout


def test_health(stack: Stack) -> None:
    statuses = ok_json(cli(stack, None, "health", "--json"))["statuses"]
    assert statuses == {
        "": "SERVING",
        "marketplace.catalog.v1.CatalogService": "SERVING",
        "marketplace.order.v1.OrderService": "SERVING",
        "marketplace.payment.v1.PaymentService": "SERVING",
    }
    unknown = cli(stack, None, "health", "--service", "no.such.Service")
    assert unknown.exit_code == REFUSED
    assert "NOT_FOUND" in unknown.stderr


def test_import_creates_then_changes_nothing_then_updates_an_edited_row(
    stack: Stack, tokens: Tokens, tmp_path: Path
) -> None:
    admin = tokens.admin()
    skus = [unique("CLI-IMP") for _ in range(3)]
    rows = [
        f'{skus[0]},Enamel mug,"Steel, enamel coat",14.00,USD,120',
        f"{skus[1]},Chopsticks,Lacquered wood,1800,JPY,60",
        f"{skus[2]},Candle,,21.50,EUR,35",
    ]
    first_file = write_csv(tmp_path, "first.csv", *rows)

    first = cli(stack, admin, "import", str(first_file))
    assert first.exit_code == 0, first.output
    assert "3 created, 0 updated, 0 unchanged, 0 refused" in first.stdout
    imported = products_by_sku(stack, set(skus))
    assert imported[skus[0]]["description"] == "Steel, enamel coat"
    assert imported[skus[1]]["price"] == {"currencyCode": "JPY", "units": "1800"}
    assert [imported[s]["stock"] for s in skus] == ["120", "60", "35"]

    ids = [imported[s]["id"] for s in skus]
    adjustments = stock_adjustments_of(stack, ids)
    second = ok_json(cli(stack, admin, "--json", "import", str(first_file)))
    assert {k: second[k] for k in ("created", "updated", "unchanged", "refused")} == {
        "created": 0,
        "updated": 0,
        "unchanged": 3,
        "refused": 0,
    }
    assert products_by_sku(stack, set(skus)) == imported
    assert stock_adjustments_of(stack, ids) == adjustments

    rows[2] = f"{skus[2]},Cedar candle,,22.00,EUR,40"
    edited = ok_json(
        cli(stack, admin, "--json", "import", str(write_csv(tmp_path, "e.csv", *rows)))
    )
    assert [r["outcome"] for r in edited["rows"]] == ["unchanged", "unchanged", "updated"]
    assert edited["rows"][2]["detail"] == "name, price, stock +5"
    after = products_by_sku(stack, set(skus))[skus[2]]
    assert after["name"] == "Cedar candle"
    assert after["price"] == {"currencyCode": "EUR", "units": "22"}
    assert after["stock"] == "40"
    assert after["createTime"] == imported[skus[2]]["createTime"]


def test_import_reports_bad_rows_and_imports_the_others(
    stack: Stack, tokens: Tokens, tmp_path: Path
) -> None:
    good = [unique("CLI-GOOD") for _ in range(2)]
    path = write_csv(
        tmp_path,
        "bad.csv",
        f"{good[0]},Good one,,5.00,USD,3",
        f'{unique("CLI-BAD")},Comma price,,"12,50",USD,3',
        f"{unique('CLI-BAD')},Unknown currency,,1.00,XYZ,3",
        "has spaces,Bad SKU,,1.00,USD,3",
        f"{unique('CLI-BAD')},Yen with cents,,10.50,JPY,3",
        f"{unique('CLI-BAD')},Negative stock,,1.00,USD,-4",
        f"{good[1]},Good two,,6.00,USD,4",
    )

    result = cli(stack, tokens.admin(), "--json", "import", str(path))

    assert result.exit_code == REFUSED, result.output
    summary = json.loads(result.stdout)
    outcomes = {r["line"]: (r["outcome"], r["detail"]) for r in summary["rows"]}
    assert outcomes[2] == ("created", "")
    assert outcomes[8] == ("created", "")
    assert outcomes[3] == ("refused", "price: '12,50' is not a number")
    # the server's own field violations
    assert outcomes[4][0] == "refused"
    assert outcomes[4][1].startswith("product.price: ")
    assert outcomes[5][0] == "refused"
    assert outcomes[5][1].startswith("product.sku: ")
    assert outcomes[6][0] == "refused"
    assert outcomes[6][1].startswith("product.price: ")
    assert outcomes[7] == ("refused", "stock: '-4' is not a whole number of units (0 or more)")
    assert (summary["created"], summary["refused"]) == (2, 5)
    assert set(products_by_sku(stack, set(good))) == set(good)

    table = cli(stack, tokens.admin(), "import", str(path))
    assert table.exit_code == REFUSED
    assert "2 unchanged, 5 refused" in table.stdout


def test_import_without_the_required_columns_is_a_usage_error(
    stack: Stack, tokens: Tokens, tmp_path: Path
) -> None:
    path = tmp_path / "wrong.csv"
    path.write_text("code,title\nA,B\n")
    result = cli(stack, tokens.admin(), "import", str(path))
    assert result.exit_code == USAGE
    assert "the header lacks sku, name, price, currency, stock" in result.stderr


def test_an_unreachable_server_exits_unavailable(stack: Stack) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    result = cli(stack, None, "products", "list", server=nobody)
    assert result.exit_code == UNAVAILABLE, result.output
    assert "UNAVAILABLE" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["products", "adjust-stock", "MUG-CLASSIC"],  # --delta missing
        ["orders", "create", "MUG-CLASSIC:two"],
        ["products", "update", "MUG-CLASSIC", "--price", "3"],  # without --currency
        ["products", "list", "--page-size", "5000"],
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2(stack: Stack, args: list[str]) -> None:
    result = cli(stack, None, *args)
    assert result.exit_code == USAGE, result.output
    assert "Usage:" in result.stderr or "Error" in result.stderr


def test_the_installed_console_script(stack: Stack, tokens: Tokens, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "marketplace"
    env = {
        **os.environ,
        "MARKETPLACE_SERVER": stack.grpc_target,
        "MARKETPLACE_TOKEN": tokens.admin(),
    }
    sample = Path(__file__).parents[2] / "clients/marketplace_cli/samples/products.csv"

    imported = subprocess.run(
        [str(script), "--json", "import", str(sample)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    summary = json.loads(imported.stdout)
    assert summary["refused"] == 0
    assert summary["created"] + summary["unchanged"] + summary["updated"] == 20

    again = subprocess.run(
        [str(script), "import", str(sample)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "0 created, 0 updated, 20 unchanged, 0 refused" in again.stdout

    listed = subprocess.run(
        [str(script), "products", "get", "CHOPSTICKS-5", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["price"] == {"currencyCode": "JPY", "units": "1800"}

    # The exit codes reach the shell from the real process, not only through CliRunner.
    for args, code in (
        (["products", "get", "NO-SUCH-SKU"], REFUSED),
        (["products", "list", "--page-size", "many"], USAGE),
        (["--server", f"127.0.0.1:{free_port()}", "health"], UNAVAILABLE),
    ):
        failed = subprocess.run(
            [str(script), *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert failed.returncode == code, (args, failed.stderr)


def test_an_import_without_the_admin_role_stops_at_once(
    stack: Stack, tokens: Tokens, tmp_path: Path
) -> None:
    skus = [unique("CLI-DENIED") for _ in range(2)]
    path = write_csv(tmp_path, "denied.csv", *(f"{sku},Denied,,1.00,USD,1" for sku in skus))
    result = cli(stack, tokens.customer(), "import", str(path))
    assert result.exit_code == REFUSED, result.output
    assert "PERMISSION_DENIED" in result.stderr
    assert "Stopped after 0 of 2 rows" in result.stderr
    assert products_by_sku(stack, set(skus)) == {}


def test_an_import_against_an_unreachable_server_exits_unavailable(
    stack: Stack, tokens: Tokens, tmp_path: Path
) -> None:
    path = write_csv(tmp_path, "down.csv", f"{unique('CLI-DOWN')},Down,,1.00,USD,1")
    nobody = f"127.0.0.1:{free_port()}"
    result = cli(stack, tokens.admin(), "--json", "import", str(path), server=nobody)
    assert result.exit_code == UNAVAILABLE, result.output
    assert json.loads(result.stdout)["stoppedBy"]["code"] == "UNAVAILABLE"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_development_tls(tmp_path_factory.mktemp("cli-tls"))


@pytest.fixture(scope="module")
def tls_stack(postgres_server_url: str, tls_files: TlsFiles) -> Iterator[Stack]:
    """The server requiring client certificates (TLS_CLIENT_CA_FILE), as in test_tls.py."""
    url = create_database(postgres_server_url, "marketplace_cli_tls")
    try:
        with running_stack(url, tls=tls_files) as stack:
            yield stack
    finally:
        drop_database(postgres_server_url, url)


def test_tls_with_a_client_certificate(tls_stack: Stack, tls_files: TlsFiles) -> None:
    certificates = [
        "--ca-cert",
        str(tls_files.ca_cert),
        "--client-cert",
        str(tls_files.client_cert),
        "--client-key",
        str(tls_files.client_key),
    ]
    healthy = cli(tls_stack, None, *certificates, "--json", "health")
    assert healthy.exit_code == 0, healthy.output
    assert set(json.loads(healthy.stdout)["statuses"].values()) == {"SERVING"}

    # Without a client certificate the server ends the handshake: unavailable, not refused.
    anonymous = cli(tls_stack, None, "--ca-cert", str(tls_files.ca_cert), "products", "list")
    assert anonymous.exit_code == UNAVAILABLE, anonymous.output

    half = cli(
        tls_stack,
        None,
        "--ca-cert",
        str(tls_files.ca_cert),
        "--client-cert",
        str(tls_files.client_cert),
        "health",
    )
    assert half.exit_code == USAGE
    assert "give --client-cert and --client-key together" in half.stderr
