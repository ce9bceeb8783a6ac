// pgjdbc (Debian's libpostgresql-jdbc-java) through pgsplit: plain Statement (simple and
// extended protocol), PreparedStatement with prepareThreshold=1 (named server statements
// S_n from the first use), batch inserts, transactions (autocommit off: pgjdbc sends BEGIN
// in the same batch as the first statement), setReadOnly(true), errors, settings.
// DRV_* environment variables: see tests/drivers/python/common.py.

import java.math.BigDecimal;
import java.sql.*;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.*;

public class JdbcTest {
    static final Map<String, String> ENV = System.getenv();
    static final Set<Integer> READ_PORTS = new TreeSet<>();
    static final int PRIMARY_PORT = Integer.parseInt(ENV.get("DRV_PRIMARY_PORT"));
    static final String UNICODE = "h\u00e9llo \u2713 \u65e5\u672c\u8a9e \uD83C\uDF89 \u00df";
    static final byte[] BYTES = {0, 1, 2, 127, (byte) 128, (byte) 254, (byte) 255, 92, 120, 48, 48, 39, 34};
    static final BigDecimal NUMERIC = new BigDecimal("12345678901234567890.123456789");
    static final OffsetDateTime TS = OffsetDateTime.of(2024, 2, 29, 23, 59, 58, 123456000, ZoneOffset.UTC);
    static int checks = 0;
    static final List<String> failed = new ArrayList<>();

    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError("check failed: " + what);
        checks++;
    }

    interface Body { void run() throws Exception; }

    static void section(String name, Body b) {
        try {
            b.run();
        } catch (Throwable e) {
            System.err.println("FAILED section '" + name + "':");
            e.printStackTrace();
            failed.add(name);
        }
    }

    static Connection connect(String extra) throws SQLException {
        String url = "jdbc:postgresql://" + ENV.getOrDefault("DRV_HOST", "127.0.0.1") + ":" + ENV.get("DRV_PORT") + "/"
                + ENV.getOrDefault("DRV_DB", "appdb") + "?sslmode=disable&prepareThreshold=1&ApplicationName=drv_jdbc" + extra;
        return DriverManager.getConnection(url, ENV.getOrDefault("DRV_USER", "app"), ENV.getOrDefault("DRV_PASSWORD", "app_pw"));
    }

    static int port(Statement st) throws SQLException {
        try (ResultSet rs = st.executeQuery("SELECT inet_server_port()")) {
            rs.next();
            return rs.getInt(1);
        }
    }

    static int port(PreparedStatement ps) throws SQLException {
        ps.setInt(1, 0);
        try (ResultSet rs = ps.executeQuery()) {
            rs.next();
            return rs.getInt(1);
        }
    }

    interface PortFn { int get() throws SQLException; }

    // fn runs one plain read and returns inet_server_port(). Passes once 8 reads in a row show
    // exactly READ_PORTS; retried for up to 5 s (a proxy with read-your-writes keeps a
    // session's reads on the primary until the replicas replayed its writes).
    static void checkReadPorts(PortFn fn, String what) throws Exception {
        long deadline = System.currentTimeMillis() + 5000;
        while (true) {
            Set<Integer> seen = new TreeSet<>();
            for (int i = 0; i < 8; i++) seen.add(fn.get());
            if (seen.equals(READ_PORTS)) {
                checks++;
                return;
            }
            check(System.currentTimeMillis() < deadline, what + ": reads went to " + seen + ", expected all of " + READ_PORTS);
            Thread.sleep(200);
        }
    }

    static void checkTxPorts(List<Integer> ports, String what) {
        Set<Integer> seen = new TreeSet<>(ports);
        check(seen.equals(Set.of(PRIMARY_PORT)), what + ": went to " + seen + ", expected only the primary " + PRIMARY_PORT);
    }

    static long count(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static void poll(Body cond, String what) throws Exception {
        long deadline = System.currentTimeMillis() + 5000;
        Throwable last = null;
        while (true) {
            try {
                cond.run();
                return;
            } catch (AssertionError | SQLException e) {
                last = e;
            }
            if (System.currentTimeMillis() > deadline) throw new AssertionError(what + ": not seen within 5 s", last);
            Thread.sleep(50);
        }
    }

    public static void main(String[] args) throws Exception {
        for (String p : ENV.get("DRV_READ_PORTS").split(",")) READ_PORTS.add(Integer.parseInt(p));
        Connection c = connect("");
        String t = "drv_jdbc_" + ProcessHandle.current().pid() + "_" + new Random().nextInt(1 << 30);

        section("write and read", () -> {
            try (Statement st = c.createStatement()) {
                try (ResultSet rs = st.executeQuery("SELECT current_user, current_setting('application_name')")) {
                    rs.next();
                    check(rs.getString(1).equals(ENV.getOrDefault("DRV_USER", "app")), "current_user");
                    check(rs.getString(2).equals("drv_jdbc"), "startup application_name " + rs.getString(2));
                }
                st.execute("CREATE TABLE " + t + " (id int PRIMARY KEY, name text, n numeric, ts timestamptz, b bytea, note text)");
            }
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + t + " VALUES (?, ?, ?, ?, ?, ?)")) {
                for (int i = 1; i <= 10; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "row " + i + " " + UNICODE);
                    ps.setBigDecimal(3, NUMERIC.add(BigDecimal.valueOf(i)));
                    ps.setObject(4, TS);
                    ps.setBytes(5, BYTES);
                    ps.setNull(6, Types.VARCHAR);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                check(counts.length == 10, "batch result length");
                for (int n : counts) check(n == 1 || n == Statement.SUCCESS_NO_INFO, "batch count " + n);
            }
            poll(() -> check(count(c, "SELECT count(*) FROM " + t) == 10, "10 rows"), "batch rows");
            try (PreparedStatement ps = c.prepareStatement("SELECT id, name, n, ts, b, note FROM " + t + " WHERE id <= ? ORDER BY id")) {
                ps.setInt(1, 10);
                try (ResultSet rs = ps.executeQuery()) {
                    for (int i = 1; i <= 10; i++) {
                        check(rs.next(), "row " + i);
                        check(rs.getInt(1) == i && rs.getString(2).equals("row " + i + " " + UNICODE), "row " + i + " name");
                        check(rs.getBigDecimal(3).compareTo(NUMERIC.add(BigDecimal.valueOf(i))) == 0, "row " + i + " numeric");
                        check(rs.getObject(4, OffsetDateTime.class).isEqual(TS), "row " + i + " timestamptz " + rs.getObject(4));
                        check(Arrays.equals(rs.getBytes(5), BYTES), "row " + i + " bytea");
                        check(rs.getString(6) == null && rs.wasNull(), "row " + i + " NULL");
                    }
                    check(!rs.next(), "10 rows only");
                }
            }
        });

        section("round trip", () -> {
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::text, ?::text, ?::numeric, ?::timestamptz, ?::bytea, ?::int8")) {
                for (int k = 0; k < 3; k++) {
                    ps.setNull(1, Types.VARCHAR);
                    ps.setString(2, UNICODE);
                    ps.setBigDecimal(3, NUMERIC);
                    ps.setObject(4, TS);
                    ps.setBytes(5, BYTES);
                    ps.setLong(6, 1L << 40);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        check(rs.getString(1) == null, "NULL");
                        check(rs.getString(2).equals(UNICODE), "unicode");
                        check(rs.getBigDecimal(3).compareTo(NUMERIC) == 0, "numeric");
                        check(rs.getObject(4, OffsetDateTime.class).isEqual(TS), "timestamptz");
                        check(Arrays.equals(rs.getBytes(5), BYTES), "bytea");
                        check(rs.getLong(6) == 1L << 40, "int8");
                    }
                }
            }
        });

        section("routing", () -> {
            List<Integer> ports = new ArrayList<>();
            try (Statement st = c.createStatement()) {
                checkReadPorts(() -> port(st), "Statement reads");
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT inet_server_port() + ?")) {
                checkReadPorts(() -> port(ps), "PreparedStatement reads");
            }
            // A transaction: autocommit off makes pgjdbc send BEGIN with the first statement.
            c.setAutoCommit(false);
            ports.clear();
            try (Statement st = c.createStatement(); PreparedStatement ps = c.prepareStatement("SELECT inet_server_port() + ?")) {
                for (int i = 0; i < 3; i++) ports.add(port(st));
                for (int i = 0; i < 3; i++) ports.add(port(ps));
                st.executeUpdate("UPDATE " + t + " SET note = 'tx' WHERE id = 1");
                check(count(c, "SELECT count(*) FROM " + t + " WHERE note = 'tx'") == 1, "read own write in a transaction");
            }
            c.commit();
            checkTxPorts(ports, "autocommit off");
            ports.clear();
            try (Statement st = c.createStatement()) {
                st.executeUpdate("UPDATE " + t + " SET note = NULL WHERE id = 1");
                ports.add(port(st));
            }
            c.rollback();
            checkTxPorts(ports, "autocommit off, rolled back");
            c.setAutoCommit(true);
            check(count(c, "SELECT count(*) FROM " + t + " WHERE id = 1 AND note = 'tx'") >= 0, "after rollback");
            // setReadOnly(true): with autocommit off pgjdbc starts read-only transactions.
            c.setReadOnly(true);
            c.setAutoCommit(false);
            ports.clear();
            try (Statement st = c.createStatement(); PreparedStatement ps = c.prepareStatement("SELECT inet_server_port() + ?")) {
                for (int i = 0; i < 3; i++) ports.add(port(st));
                for (int i = 0; i < 3; i++) ports.add(port(ps));
                boolean refused = false;
                try {
                    st.executeUpdate("UPDATE " + t + " SET note = 'ro' WHERE id = 2");
                } catch (SQLException e) {
                    refused = "25006".equals(e.getSQLState());
                }
                check(refused, "write refused in a read-only transaction");
            }
            c.rollback();
            Set<Integer> seen = new TreeSet<>(ports);
            check(seen.size() == 1 && (READ_PORTS.containsAll(seen) || seen.contains(PRIMARY_PORT)),
                    "read-only transaction stays on one server: " + seen);
            c.setAutoCommit(true);
            try (Statement st = c.createStatement()) {
                checkReadPorts(() -> port(st), "read-only autocommit reads");
            }
            c.setReadOnly(false);
        });

        section("errors", () -> {
            try (Statement st = c.createStatement()) {
                for (String sql : new String[] {"SELEC 1", "SELECT 1 FROM"}) {
                    String state = null;
                    try {
                        st.executeQuery(sql);
                    } catch (SQLException e) {
                        state = e.getSQLState();
                    }
                    check("42601".equals(state), "syntax error state " + state);
                    check(port(st) > 0, "usable after syntax error");
                }
            }
            String state = null;
            try (PreparedStatement ps = c.prepareStatement("SELEC ?")) {
                ps.setInt(1, 1);
                ps.executeQuery();
            } catch (SQLException e) {
                state = e.getSQLState();
            }
            check("42601".equals(state), "prepared syntax error state " + state);
            c.setAutoCommit(false);
            state = null;
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + t + " (id) VALUES (?)")) {
                ps.setInt(1, 1);
                ps.executeUpdate();
            } catch (SQLException e) {
                state = e.getSQLState();
            }
            check("23505".equals(state), "unique violation " + state);
            c.rollback();
            c.setAutoCommit(true);
            try (Statement st = c.createStatement()) {
                check(port(st) > 0, "usable after rollback");
            }
        });

        section("settings", () -> {
            try (Statement st = c.createStatement()) {
                st.execute("SET search_path TO drv_nowhere, public");
                st.execute("SET application_name = 'drv_jdbc_set'");
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT current_setting('search_path'), current_setting(?)")) {
                for (int i = 0; i < 6; i++) {
                    ps.setString(1, "application_name");
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        check(rs.getString(1).equals("drv_nowhere, public"), "search_path " + rs.getString(1));
                        check(rs.getString(2).equals("drv_jdbc_set"), "application_name " + rs.getString(2));
                    }
                }
            }
            check(count(c, "SELECT count(*) FROM " + t) == 10, "unqualified table");
            c.setSchema("public");
            check(c.getSchema().equals("public"), "setSchema");
            try (Statement st = c.createStatement()) {
                st.execute("RESET search_path");
            }
        });

        section("prepared reuse", () -> {
            try (PreparedStatement ps = c.prepareStatement("SELECT name, inet_server_port() FROM " + t + " WHERE id = ?")) {
                for (int i = 0; i < 50; i++) {
                    int k = 1 + i % 10;
                    ps.setInt(1, k);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getString(1).equals("row " + k + " " + UNICODE), "reuse " + i);
                    }
                }
                checkReadPorts(() -> {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        return rs.getInt(2);
                    }
                }, "prepared statement");
            }
            // Batch of updates through one named statement, in a transaction.
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("UPDATE " + t + " SET note = ? WHERE id = ?")) {
                for (int i = 1; i <= 10; i++) {
                    ps.setString(1, "b" + i);
                    ps.setInt(2, i);
                    ps.addBatch();
                }
                check(ps.executeBatch().length == 10, "update batch");
            }
            c.commit();
            c.setAutoCommit(true);
            poll(() -> check(count(c, "SELECT count(*) FROM " + t + " WHERE note LIKE 'b%'") == 10, "updated"), "batch updates");
            // A fetch-size cursor (portal with row limit) needs a transaction.
            c.setAutoCommit(false);
            List<Integer> ids = new ArrayList<>();
            try (PreparedStatement ps = c.prepareStatement("SELECT id FROM " + t + " ORDER BY id")) {
                ps.setFetchSize(3);
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) ids.add(rs.getInt(1));
                }
            }
            c.commit();
            c.setAutoCommit(true);
            check(ids.size() == 10 && ids.get(0) == 1 && ids.get(9) == 10, "fetch size cursor " + ids);
        });

        try (Statement st = c.createStatement()) {
            st.execute("DROP TABLE " + t);
        }
        c.close();
        if (!failed.isEmpty()) {
            System.out.println("pgjdbc: " + checks + " checks passed, FAILED sections: " + String.join(", ", failed));
            System.exit(1);
        }
        System.out.println("pgjdbc: " + checks + " checks passed");
    }
}
