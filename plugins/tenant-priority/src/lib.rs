//! Priority from a tenant-tier table.
//!
//! Configuration:
//! - `header`: the header naming the tenant (default `tenant`);
//! - `tenant.<id>=<tier>`: each tenant's tier;
//! - `tier.<tier>=<0-9>`: each tier's priority;
//! - `default`: priority for unknown tenants (default 4).

use switchyard_plugin::prelude::*;

/// The priority hook.
pub fn priority(m: &Message) -> u8 {
    let default = host::config_or("default", 4u8).min(9);
    let header = host::config("header").unwrap_or_else(|| "tenant".into());
    let Some(tenant) = m.header_str(&header) else {
        return default;
    };
    host::config(&format!("tenant.{tenant}"))
        .and_then(|tier| host::config(&format!("tier.{tier}")))
        .and_then(|p| p.parse::<u8>().ok())
        .map(|p| p.min(9))
        .unwrap_or(default)
}

switchyard_plugin::export_priority!(priority);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin::testing;

    fn setup() {
        testing::reset();
        testing::set_config("tenant.acme", "gold");
        testing::set_config("tenant.initech", "bronze");
        testing::set_config("tier.gold", "9");
        testing::set_config("tier.bronze", "1");
    }

    #[test]
    fn tiers_map_to_priorities() {
        setup();
        assert_eq!(
            priority(&TestMessage::new("").header("tenant", "acme").as_message()),
            9
        );
        assert_eq!(
            priority(
                &TestMessage::new("")
                    .header("tenant", "initech")
                    .as_message()
            ),
            1
        );
    }

    #[test]
    fn unknown_tenants_get_the_default() {
        setup();
        assert_eq!(
            priority(&TestMessage::new("").header("tenant", "nobody").as_message()),
            4
        );
        assert_eq!(priority(&TestMessage::new("").as_message()), 4);
        testing::set_config("default", "2");
        assert_eq!(priority(&TestMessage::new("").as_message()), 2);
    }

    #[test]
    fn out_of_range_config_is_clamped() {
        setup();
        testing::set_config("tier.gold", "42");
        assert_eq!(
            priority(&TestMessage::new("").header("tenant", "acme").as_message()),
            9
        );
    }
}
