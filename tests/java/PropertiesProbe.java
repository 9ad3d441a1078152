// What the CloudStack agent's JVM makes of agent.properties and cloud.jks, for tests.
//
// Run in single-file source mode (JDK 11+): java PropertiesProbe.java MODE ARGS...
//   load FILE...          each file's keystore.passphrase as Properties.load(InputStream)
//                         reads it (the agent's AgentShell does), as hex UTF-16 units, "null"
//                         when there is none, "error" when a backslash-u escape is malformed
//   store HEX...          each value (hex UTF-16 units) as Properties.store writes it
//   open PROPS KEYSTORE...  open each PKCS#12 keystore with the passphrase its PROPS holds
import java.io.ByteArrayOutputStream;
import java.io.FileInputStream;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.security.KeyStore;
import java.util.Collections;
import java.util.Properties;

public class PropertiesProbe {
    public static void main(String[] args) throws Exception {
        switch (args[0]) {
            case "load":
                for (int i = 1; i < args.length; i++) {
                    try {
                        String value = load(args[i]).getProperty("keystore.passphrase");
                        System.out.println(value == null ? "null" : hex(value));
                    } catch (IllegalArgumentException malformed) {
                        System.out.println("error");
                    }
                }
                break;
            case "store":
                for (int i = 1; i < args.length; i++) {
                    System.out.println(store(unhex(args[i])));
                }
                break;
            case "open":
                for (int i = 1; i + 1 < args.length; i += 2) {
                    System.out.println(open(args[i], args[i + 1]));
                }
                break;
            default:
                throw new IllegalArgumentException(args[0]);
        }
    }

    static Properties load(String path) throws Exception {
        Properties properties = new Properties();
        try (InputStream in = new FileInputStream(path)) {
            properties.load(in);
        }
        return properties;
    }

    static String open(String propertiesPath, String keystorePath) throws Exception {
        String passphrase = load(propertiesPath).getProperty("keystore.passphrase");
        KeyStore keystore = KeyStore.getInstance("PKCS12");
        try (InputStream in = new FileInputStream(keystorePath)) {
            keystore.load(in, passphrase.toCharArray());
        } catch (java.io.IOException wrong) {
            return "cannot open: " + wrong.getMessage();
        }
        boolean key = keystore.getKey("cloud", passphrase.toCharArray()) != null;
        return "opened " + Collections.list(keystore.aliases()) + " key " + key;
    }

    static String store(String value) throws Exception {
        Properties properties = new Properties();
        properties.setProperty("k", value);
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        properties.store(out, null);
        for (String line : out.toString(StandardCharsets.ISO_8859_1).split("\n")) {
            if (line.startsWith("k=")) {
                return line.substring(2);
            }
        }
        throw new IllegalStateException("no k= line");
    }

    static String hex(String value) {
        StringBuilder out = new StringBuilder("u");
        for (char c : value.toCharArray()) {
            out.append(String.format("%04x", (int) c));
        }
        return out.toString();
    }

    static String unhex(String hex) {
        StringBuilder out = new StringBuilder();
        for (int i = 1; i < hex.length(); i += 4) {
            out.append((char) Integer.parseInt(hex.substring(i, i + 4), 16));
        }
        return out.toString();
    }
}
